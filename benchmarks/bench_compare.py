"""
Side by side: time the same workloads through this port's public API and through a checkout of
the reference (openai/guided-diffusion), in alternating subprocesses, and print one JSON line per
run plus one summary line per workload with the medians and their ratio.

    python benchmarks/bench_compare.py --reference ../ref/guided-diffusion --config attn32 --threads 2
    python benchmarks/bench_compare.py --reference REF --config adm64 --device cuda --use_fp16 True \\
        --batch_size 64 --sample_batch_size 256 --guided_batch_size 64

Workloads (--workloads, comma-separated):
  train   TrainLoop.run_step on one fixed batch (AdamW, EMA 0.9999, uniform timesteps).
  ddim    diffusion.ddim_sample_loop of the class-conditional model (--respacing, default ddim25).
  guided  the same loop with classifier guidance (a noisy classifier's grad log p(y | x_t)).

Each run reports throughput (samples/s or images/s over the timed part; on CPU also from the
median and the fastest single step, the least disturbed figure on a shared machine), wall and
CPU seconds, peak memory
(CUDA: max allocated; CPU: peak resident set during the timed part), the model FLOPs per image
(torch.utils.flop_counter, attention counted as its matmuls; "gflop_per_image" is what each
process executes, the reference recomputing its attention in backward) and the model FLOP
utilisation ("mfu", the port's FLOP count for both) against --peak_tflops, or else against a
dense matmul rate each process measures right before its timed part. Without --reference
only the port runs. Weights are random: speed does not depend on them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_cli import run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKLOADS = ("train", "ddim", "guided")
NUM_CLASSES = 1000  # the reference's create_model fixes it


def str2bool(value):
    lowered = str(value).lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def create_argparser():
    parser = argparse.ArgumentParser(
        description="Time training and sampling of this port against the reference, side by side."
    )
    parser.add_argument("--reference", default="",
                        help="a checkout of openai/guided-diffusion (empty: time the port only)")
    parser.add_argument("--config", default="attn32", help="a name from bench_configs.py")
    parser.add_argument("--workloads", default="train,ddim,guided")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU intra-op threads in every process (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per implementation")
    parser.add_argument("--batch_size", type=int, default=8, help="training batch")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (or sampling steps) first")
    parser.add_argument("--sample_batch_size", type=int, default=8)
    parser.add_argument("--guided_batch_size", type=int, default=8)
    parser.add_argument("--respacing", default="ddim25")
    parser.add_argument("--classifier_scale", type=float, default=1.0)
    parser.add_argument("--use_fp16", type=str2bool, default=False)
    parser.add_argument("--use_bf16", type=str2bool, default=False, help="port only")
    parser.add_argument("--compile", type=str2bool, default=False, help="port only: torch.compile")
    parser.add_argument("--channels_last", type=str2bool, default=False,
                        help="port only: channels-last weights and activations")
    parser.add_argument("--tf32", type=str2bool, default=True,
                        help="CUDA: TF32 float32 matmuls/convolutions in both processes")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak dense rate for the FLOP utilisation (0: measure a matmul)")
    parser.add_argument("--impl", choices=("port", "reference"), default=None,
                        help=argparse.SUPPRESS)  # internal: run one workload in this process
    parser.add_argument("--workload", choices=WORKLOADS, default=None, help=argparse.SUPPRESS)
    return parser


# ================================================================================== parent


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.impl is not None:
        print(json.dumps(run_worker(args)), flush=True)
        return
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"unknown workloads {unknown}: choose from {', '.join(WORKLOADS)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no GPU is visible")
    impls = ["port"]
    if args.reference:
        reference = os.path.abspath(os.path.expanduser(args.reference))
        if not os.path.isfile(os.path.join(reference, "guided_diffusion", "gaussian_diffusion.py")):
            raise ValueError(
                f"--reference {args.reference} is not a checkout of openai/guided-diffusion "
                "(no guided_diffusion/gaussian_diffusion.py): git clone "
                "https://github.com/openai/guided-diffusion and pass its folder"
            )
        args.reference = reference
        impls.append("reference")
    records = {w: {impl: [] for impl in impls} for w in workloads}
    # Model FLOPs per image are the port's count for both: the reference also recomputes every
    # attention block in backward (always-on checkpointing), which is work, not model FLOPs.
    model_gflop = {}
    for run in range(args.repeat):
        for workload in workloads:
            # Alternate which implementation goes first, so drifting machine load hits both.
            order = impls if run % 2 == 0 else impls[::-1]
            for impl in order:
                record = spawn_worker(args, impl, workload)
                record["run"] = run
                if impl == "port" and record.get("gflop_per_image"):
                    model_gflop.setdefault(workload, record["gflop_per_image"])
                gflop = model_gflop.get(workload, record.get("gflop_per_image"))
                if gflop and record.get("throughput") and record.get("peak_flops"):
                    record["mfu"] = gflop * 1e9 * record["throughput"] / record["peak_flops"]
                print(json.dumps(record), flush=True)
                records[workload][impl].append(record)
    for workload in workloads:
        print(json.dumps(summarise(workload, records[workload], args)), flush=True)


def summarise(workload, by_impl, args):
    summary = {"bench": workload, "summary": True, "config": args.config, "device": args.device,
               "threads": args.threads or None, "runs": args.repeat}
    for impl, runs in by_impl.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            summary[f"{impl}_error"] = runs[0].get("error") if runs else "no runs"
            continue
        summary[f"{impl}_median"] = statistics.median(r["throughput"] for r in good)
        if all("throughput_best_step" in r for r in good):
            summary[f"{impl}_median_step"] = statistics.median(
                r["throughput_median_step"] for r in good
            )
            summary[f"{impl}_best_step"] = max(r["throughput_best_step"] for r in good)
        summary[f"{impl}_cpu_s_median"] = statistics.median(r["cpu_s"] for r in good)
        summary[f"{impl}_peak_mem_mb"] = statistics.median(r["peak_mem_mb"] for r in good)
        summary[f"{impl}_mfu"] = statistics.median(r.get("mfu", 0.0) for r in good)
        summary["unit"] = good[0]["unit"]
    if "port_median" in summary and "reference_median" in summary:
        summary["ratio"] = summary["port_median"] / summary["reference_median"]
        for kind in ("median_step", "best_step"):
            if f"port_{kind}" in summary and f"reference_{kind}" in summary:
                summary[f"ratio_{kind}"] = summary[f"port_{kind}"] / summary[f"reference_{kind}"]
    return summary


def worker_env(args):
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        env["MKL_NUM_THREADS"] = str(args.threads)
    # The worker decides which guided_diffusion it imports; an inherited path must not.
    env.pop("PYTHONPATH", None)
    if not args.device.startswith("cuda"):
        # The reference picks CUDA (and DDP) whenever a GPU is visible, whatever --device says.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def spawn_worker(args, impl, workload):
    argv = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--workload", workload]
    for key, value in vars(args).items():
        if key in ("impl", "workload", "workloads", "repeat") or value is None:
            continue
        argv += [f"--{key}", str(value)]
    result = subprocess.run(argv, env=worker_env(args), capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"bench": workload, "impl": impl, "config": args.config, "error": tail}
    return json.loads(lines[-1])


def measure_matmul_rate(args):
    """Dense matmul FLOP/s on the benchmark device and dtype (median of a few timed products)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = args.use_bf16 and args.impl != "reference"  # the reference has no bf16 path
    dtype = torch.float16 if args.use_fp16 else torch.bfloat16 if bf16 else torch.float32
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPU half matmuls are not a meaningful peak
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cuda":
        set_tf32(args.tf32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4 if device.type == "cpu" else 20):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first round warms up
            times.append((time.perf_counter() - start) / (4 if device.type == "cpu" else 20))
    return 2 * n**3 / statistics.median(times)


# ================================================================================== worker


def run_worker(args):
    try:
        return _run_worker(args)
    except Exception as exc:  # one JSON line saying what went wrong, never a silent gap
        return {"bench": args.workload, "impl": args.impl, "config": args.config,
                "error": f"{type(exc).__name__}: {exc}"}


def import_implementation(args):
    """Import guided_diffusion from this repository or from the reference checkout."""
    root = REPO if args.impl == "port" else args.reference
    sys.path.insert(0, root)
    if args.impl == "reference":
        stub_missing_reference_dependencies()
    import guided_diffusion

    found = os.path.dirname(os.path.dirname(os.path.abspath(guided_diffusion.__file__)))
    if os.path.realpath(found) != os.path.realpath(root):
        raise RuntimeError(f"imported guided_diffusion from {found}, expected {root}")
    from guided_diffusion import dist_util, logger, resample, script_util, train_util, unet

    return dict(dist_util=dist_util, logger=logger, resample=resample, script_util=script_util,
                train_util=train_util, unet=unet)


def stub_missing_reference_dependencies():
    """The reference imports mpi4py and blobfile at module level; stub them only if missing."""
    import importlib.util

    stubs = {}
    if importlib.util.find_spec("mpi4py") is None:
        stubs["mpi4py/__init__.py"] = (
            "class _Comm:\n"
            "    rank, size = 0, 1\n"
            "    def Get_rank(self): return 0\n"
            "    def Get_size(self): return 1\n"
            "    def bcast(self, value, root=0): return value\n"
            "    def allgather(self, value): return [value]\n"
            "    def Barrier(self): pass\n"
            "class MPI:\n"
            "    COMM_WORLD = _Comm()\n"
        )
    if importlib.util.find_spec("blobfile") is None:
        stubs["blobfile.py"] = (
            "import os\n"
            "BlobFile = open\n"
            "join, exists, dirname, basename = os.path.join, os.path.exists, os.path.dirname, "
            "os.path.basename\n"
            "listdir, isdir = os.listdir, os.path.isdir\n"
        )
    if stubs:
        folder = tempfile.mkdtemp(prefix="gd_ref_stubs_")
        for name, text in stubs.items():
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        sys.path.insert(1, folder)


def _run_worker(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    api = import_implementation(args)
    sys.path.insert(0, HERE)
    from bench_configs import config_flags, peak_memory_tracker

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        set_tf32(args.tf32)  # the same setting for both implementations
    ddp = init_single_rank_group(args, device)
    torch.manual_seed(0)
    flags = reference_flags(api, config_flags(args.config, num_classes=NUM_CLASSES))
    if args.workload != "train":
        flags["timestep_respacing"] = args.respacing
    flags["use_fp16"] = args.use_fp16
    model, diffusion = api["script_util"].create_model_and_diffusion(**flags)
    model.to(device)
    port = args.impl == "port"
    if port and args.use_bf16 and args.workload != "train":
        model.convert_to_bf16()
    elif args.use_fp16 and args.workload != "train":
        model.convert_to_fp16()
    size = flags["image_size"]

    if args.workload == "train":
        measure = train_workload(args, api, model, diffusion, flags, device, port)
        batch = args.batch_size
    else:
        model.eval()
        classifier = None
        if args.workload == "guided":
            classifier = build_classifier(api, args, size, device, port)
        measure = sampling_workload(args, api, model, diffusion, classifier, size, device, port)
        batch = args.guided_batch_size if classifier is not None else args.sample_batch_size

    # The peak is measured in each process right before its timed part, so that a busy machine
    # lowers both alike.
    if args.peak_tflops > 0:
        peak, peak_source = args.peak_tflops * 1e12, "given"
    else:
        peak, peak_source = measure_matmul_rate(args), "measured matmul"
    tracker = peak_memory_tracker(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    units, step_times = measure()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    throughput = units * batch / wall
    record = {
        "bench": args.workload, "impl": args.impl, "config": args.config, "device": str(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": batch,
        "throughput": throughput,
        "unit": "samples/s" if args.workload == "train" else "images/s",
        "seconds": wall, "cpu_s": cpu, "peak_mem_mb": tracker(), "peak_mem_kind": tracker.kind,
        "use_fp16": args.use_fp16, "ddp": ddp,
        "gflop_per_image": measure.flops_per_image / 1e9,
        "peak_flops": peak, "peak_source": peak_source,
    }
    if step_times:
        # On a shared machine the fastest step is the least disturbed estimate; the median step
        # is in between. (CPU only: timing single GPU steps would need a synchronisation each.)
        per_unit = 1 if args.workload == "train" else diffusion.num_timesteps
        record["throughput_median_step"] = batch / (statistics.median(step_times) * per_unit)
        record["throughput_best_step"] = batch / (min(step_times) * per_unit)
    if args.workload != "train":
        record["steps"] = diffusion.num_timesteps
    if port:
        from guided_diffusion.runtime.perf import is_compiled

        record.update(use_bf16=args.use_bf16, compile=args.compile, compiled=is_compiled(model),
                      channels_last=args.channels_last)
    return record


def reference_flags(api, flags):
    """The config's flags restricted to what this implementation's factory takes."""
    defaults = api["script_util"].model_and_diffusion_defaults()
    return {key: flags[key] for key in defaults}


def init_single_rank_group(args, device):
    """
    The reference's TrainLoop needs a process group (it asks for the world size) and, on CUDA,
    wraps the model in DDP; the port wraps it whenever a group exists. A 1-rank group is made for
    the reference always and for the port on CUDA only, so that both use DDP on GPUs (as a real
    one-GPU run of the reference does) and neither does on CPU (the reference skips DDP there).
    """
    import torch.distributed as dist

    if args.impl == "port" and device.type != "cuda":
        return False
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=0, world_size=1)
    return device.type == "cuda"


def set_tf32(enabled):
    """TF32 for float32 CUDA matmuls and convolutions (torch's new switches when it has them)."""
    import torch

    precision = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None:
        matmul.fp32_precision = conv.fp32_precision = precision
    else:
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


def count_flops(fn):
    """
    FLOPs of fn() as torch.utils.flop_counter counts them (matmuls, convolutions, attention as
    its matmuls on the math kernel). Its formulas are applied by a plain dispatch mode: the
    module tracking of FlopCounterMode breaks the reference's hand-written checkpoint Function
    and autograd.grad (used by guidance).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += formula(*args, **kwargs, out_val=out)
            return out

    with sdpa_kernel([SDPBackend.MATH]), Counter():
        fn()
    return Counter.total


def train_workload(args, api, model, diffusion, flags, device, port):
    import torch

    logdir = tempfile.mkdtemp(prefix="gd_bench_")
    api["logger"].configure(dir=logdir, format_strs=[])
    gen = torch.Generator().manual_seed(0)
    size = flags["image_size"]
    x = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    t = torch.tensor([diffusion.num_timesteps // 2])
    y = torch.randint(0, NUM_CLASSES, (1,), generator=gen)
    kwargs = {"y": y.to(device)} if flags["class_cond"] else {}

    def forward_backward():
        model(x.to(device), t.to(device), **kwargs).float().sum().backward()

    flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    options = dict(
        model=model, diffusion=diffusion, data=None, batch_size=args.batch_size, microbatch=-1,
        lr=1e-4, ema_rate="0.9999", log_interval=10**9, save_interval=10**9, resume_checkpoint="",
        use_fp16=args.use_fp16, fp16_scale_growth=1e-3,
        schedule_sampler=api["resample"].create_named_schedule_sampler("uniform", diffusion),
        weight_decay=0.0, lr_anneal_steps=0,
    )
    if port:
        options["use_bf16"] = args.use_bf16
        from guided_diffusion.runtime.perf import compile_model, to_channels_last

        to_channels_last(model, args.channels_last)
        compile_model(model, args.compile)
    loop = api["train_util"].TrainLoop(**options)
    batch = torch.rand(args.batch_size, 3, size, size, generator=gen) * 2 - 1
    cond = {"y": torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen)}
    if not flags["class_cond"]:
        cond = {}
    for _ in range(args.warmup):
        loop.run_step(batch, cond)
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    def measure():
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loop.run_step(batch, cond)
            times.append(time.perf_counter() - start)
        return args.steps, times if device.type == "cpu" else []

    measure.flops_per_image = flops
    return measure


def build_classifier(api, args, size, device, port):
    """The config's noisy classifier, built from the EncoderUNetModel class both projects share."""
    import torch

    sys.path.insert(0, HERE)
    from bench_configs import classifier_kwargs

    torch.manual_seed(1)
    classifier = api["unet"].EncoderUNetModel(**classifier_kwargs(args.config, size, args.use_fp16))
    classifier.to(device)
    if args.use_fp16:
        classifier.convert_to_fp16()
    elif port and args.use_bf16:
        classifier.convert_to_bf16()
    classifier.eval()
    return classifier


def sampling_workload(args, api, model, diffusion, classifier, size, device, port):
    import torch
    import torch.nn.functional as F

    batch = args.guided_batch_size if classifier is not None else args.sample_batch_size
    shape = (batch, 3, size, size)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    cond_fn = None
    if classifier is not None:
        if port:
            from guided_diffusion.diffusion.guidance import make_classifier_cond_fn

            cond_fn = make_classifier_cond_fn(classifier, args.classifier_scale)
        else:
            # The reference keeps its guidance function in scripts/classifier_sample.py; this is
            # the same computation: scale * d/dx log softmax(classifier(x, t))[y].
            def cond_fn(x, t, y=None):
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
                    chosen = log_probs[range(len(log_probs)), y.view(-1)]
                    return torch.autograd.grad(chosen.sum(), x_in)[0] * args.classifier_scale

    def one_image_flops():
        x1 = torch.randn(1, 3, size, size, device=device)
        t1 = torch.tensor([diffusion.num_timesteps - 1], device=device)
        with torch.no_grad():
            model(x1, t1, y=labels[:1])
        if cond_fn is not None:
            cond_fn(x1, t1, y=labels[:1])

    flops = count_flops(one_image_flops) * diffusion.num_timesteps
    if port:
        from guided_diffusion.runtime.perf import compile_model, to_channels_last

        for network in (model, classifier):
            if network is not None:
                to_channels_last(network, args.channels_last)
                compile_model(network, args.compile)
    kwargs = {"y": labels}
    x = torch.randn(*shape, device=device)
    for i in range(args.warmup):
        t = torch.full((batch,), diffusion.num_timesteps - 1 - i % diffusion.num_timesteps,
                       device=device, dtype=torch.long)
        with torch.no_grad():
            diffusion.ddim_sample(model, x, t, model_kwargs=kwargs, cond_fn=cond_fn)
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    def measure():
        if device.type != "cpu":
            diffusion.ddim_sample_loop(model, shape, model_kwargs=kwargs, cond_fn=cond_fn,
                                       device=device, progress=False)
            return 1, []
        # The same loop (ddim_sample_loop drains this generator), timed step by step.
        times, start = [], time.perf_counter()
        for _ in diffusion.ddim_sample_loop_progressive(
            model, shape, model_kwargs=kwargs, cond_fn=cond_fn, device=device, progress=False
        ):
            now = time.perf_counter()
            times.append(now - start)
            start = now
        return 1, times

    measure.flops_per_image = flops
    return measure


if __name__ == "__main__":
    run_cli(main)
