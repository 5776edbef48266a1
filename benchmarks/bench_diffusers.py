"""
This port against Hugging Face diffusers on the same weights: export a model
(scripts/export_diffusers.py's library), load the export in diffusers, and time both in
alternating subprocesses on the same inputs. One JSON line per run, then one summary line per
workload with the medians, their ratio (diffusers' time / ours: > 1 means we are faster) and how
far the two outputs differ.

    python benchmarks/bench_diffusers.py --config attn32_1head --threads 1 --batch_size 8
    python benchmarks/bench_diffusers.py --config adm64 --threads 2 --batch_size 1 --repeat 2

Workloads (--workloads, comma-separated), the code around the network the same for both:
  train    one training step: q_sample, the network, the epsilon MSE, backward, AdamW.
  forward  one forward pass of the network (no gradients).
  ddim     a deterministic --ddim_steps DDIM loop (eta 0, x_0 clipped): ours is the diffusion's
           ddim_sample_loop over the "ddim<N>" respacing, diffusers' is DDIMScheduler from the
           exported scheduler config, stepping with the epsilon channels.

Each side runs in its own process (the order alternates each repeat, so a load change on a
shared machine hits both alike) with --threads intra-op threads. A process times
--steps iterations of train and forward after one warm-up and reports the median, and one full
DDIM loop. Weights are random normal (so the outputs say something); speed does not depend on
them.
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
WORKLOADS = ("train", "forward", "ddim")
SIDES = ("ours", "diffusers")


def create_argparser():
    parser = argparse.ArgumentParser(
        description="Time this port against diffusers on the same exported weights, side by side."
    )
    parser.add_argument("--config", default="attn32_1head", help="a name from bench_configs.py")
    parser.add_argument("--workloads", default="train,forward,ddim")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=3, help="timed train/forward iterations")
    parser.add_argument("--ddim_steps", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--work_dir", default="", help="keep the export and inputs here")
    parser.add_argument("--profile", default="", help="ours|diffusers: print a torch.profiler "
                        "table of that side's forward pass instead of timing")
    # Internal: a worker process.
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return parser


def main():
    args = create_argparser().parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r}: choose from {', '.join(WORKLOADS)}")
    if args.batch_size < 1 or args.steps < 1 or args.repeat < 1:
        raise ValueError("--batch_size, --steps and --repeat must be at least 1")
    if args.worker:
        return worker(args, workloads)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_diffusers_")
    prepare(args, work)
    if args.profile:
        return _run_worker(args, work, args.profile, workloads, profile=True)
    runs = {side: [] for side in SIDES}
    for r in range(args.repeat):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            record = _run_worker(args, work, side, workloads)
            runs[side].append(record)
            print(json.dumps(record), flush=True)
    summarise(args, work, runs, workloads)


def _run_worker(args, work, side, workloads, profile=False):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--work_dir", work,
           "--config", args.config, "--workloads", ",".join(workloads),
           "--batch_size", str(args.batch_size), "--threads", str(args.threads),
           "--steps", str(args.steps), "--ddim_steps", str(args.ddim_steps),
           "--num_classes", str(args.num_classes)]
    if profile:
        cmd += ["--profile", side]
        return subprocess.run(cmd, env=env, check=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flags(args):
    from bench_configs import config_flags

    return config_flags(args.config, num_classes=args.num_classes)


def prepare(args, work):
    """Build, perturb and export the model; draw the shared inputs."""
    import torch

    from guided_diffusion.interop.diffusers_export import export_diffusers
    from guided_diffusion.script_util import create_model_and_diffusion

    flags = _flags(args)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), os.path.join(work, "ours.pt"))
    export_diffusers(model, diffusion, os.path.join(work, "export"), overwrite=True)
    size, channels = flags["image_size"], flags.get("in_channels", 3)
    gen = torch.Generator().manual_seed(1)
    n = args.batch_size
    inputs = dict(
        x0=torch.randn(n, channels, size, size, generator=gen).clamp(-1, 1),
        noise=torch.randn(n, channels, size, size, generator=gen),
        t=torch.randint(0, flags["diffusion_steps"], (n,), generator=gen),
        y=torch.randint(0, args.num_classes, (n,), generator=gen) if flags["class_cond"] else None,
        sample_noise=torch.randn(n, channels, size, size, generator=gen),
    )
    torch.save(inputs, os.path.join(work, "inputs.pt"))


def worker(args, workloads):
    import torch

    torch.set_num_threads(args.threads)
    work = args.work_dir
    inputs = torch.load(os.path.join(work, "inputs.pt"))
    flags = _flags(args)
    alphas_cumprod = _alphas_cumprod(flags)
    if args.worker == "ours":
        net, call, ddim = _ours(args, work, flags)
    else:
        net, call, ddim = _theirs(args, work)
    if args.profile:
        return _profile(call, inputs)
    record = {"side": args.worker, "config": args.config, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    outputs = {}
    x0, noise, t, y = inputs["x0"], inputs["noise"], inputs["t"], inputs["y"]
    a = alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if "train" in workloads:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        losses = []

        def step():
            # The same code around both networks: q_sample, epsilon MSE, backward, AdamW.
            a_t = alphas_cumprod[t].float().view(-1, 1, 1, 1)
            noisy = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
            eps = call(noisy, t, y)[:, : x0.shape[1]]
            loss = ((eps - noise) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        net.train()
        # The first loss is taken before any update: both sides compute it from equal weights.
        record["train_s"] = _median_time(step, args.steps)
        record["train_first_loss"] = float(losses[0])
        # The later steps changed the weights: reload for the other workloads.
        net, call, ddim = _ours(args, work, flags) if args.worker == "ours" else _theirs(args, work)
    net.eval()
    if "forward" in workloads:
        with torch.no_grad():
            record["forward_s"] = _median_time(lambda: outputs.__setitem__(
                "forward", call(x_t, t, y)), args.steps)
    if "ddim" in workloads:
        with torch.no_grad():
            call(x_t, t, y)  # warm-up
            t0 = time.perf_counter()
            outputs["ddim"] = ddim(inputs["sample_noise"], y)
            record["ddim_s"] = time.perf_counter() - t0
    torch.save(outputs, os.path.join(work, f"out_{args.worker}.pt"))
    print(json.dumps(record), flush=True)


def _median_time(fn, steps):
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _alphas_cumprod(flags):
    import torch

    from guided_diffusion.script_util import diffusion_from_flags

    return torch.from_numpy(diffusion_from_flags(flags, "").alphas_cumprod)


def _ours(args, work, flags):
    import torch

    from guided_diffusion.script_util import create_model_and_diffusion, diffusion_for_steps

    model, _ = create_model_and_diffusion(**flags)
    model.load_state_dict(torch.load(os.path.join(work, "ours.pt")))
    sampler = diffusion_for_steps(flags, args.ddim_steps)

    def call(x, t, y):
        return model(x, t, y=y)

    def ddim(noise, y):
        kwargs = {"y": y} if y is not None else {}
        return sampler.ddim_sample_loop(model, tuple(noise.shape), noise=noise,
                                        clip_denoised=True, model_kwargs=kwargs, eta=0.0)

    return model, call, ddim


def _theirs(args, work):
    import diffusers

    export = os.path.join(work, "export")
    unet = diffusers.UNet2DModel.from_pretrained(export, subfolder="unet")
    scheduler = diffusers.DDIMScheduler.from_pretrained(export, subfolder="scheduler")

    def call(x, t, y):
        return unet(x, t, class_labels=y).sample

    def ddim(noise, y):
        scheduler.set_timesteps(args.ddim_steps)
        x = noise
        for step_t in scheduler.timesteps:
            eps = unet(x, step_t, class_labels=y).sample[:, : noise.shape[1]]
            # use_clipped_model_output: the noise implied by the clipped x_0 drives the step,
            # as our DDIM does (it recomputes eps from the clipped prediction).
            x = scheduler.step(eps, step_t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        return x

    return unet, call, ddim


def _profile(call, inputs):
    import torch
    from torch.profiler import ProfilerActivity, profile

    x, t, y = inputs["x0"], inputs["t"], inputs["y"]
    with torch.no_grad():
        call(x, t, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call(x, t, y)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def summarise(args, work, runs, workloads):
    import torch

    outs = {side: torch.load(os.path.join(work, f"out_{side}.pt")) for side in SIDES}
    for w in workloads:
        key = f"{w}_s"
        ours = statistics.median(r[key] for r in runs["ours"])
        theirs = statistics.median(r[key] for r in runs["diffusers"])
        # The fastest run of each side: the least disturbed figure on a shared machine.
        ours_min = min(r[key] for r in runs["ours"])
        theirs_min = min(r[key] for r in runs["diffusers"])
        if w == "train":
            a, b = runs["ours"][0]["train_first_loss"], runs["diffusers"][0]["train_first_loss"]
            diff = abs(a - b) / abs(b)
        else:
            a, b = outs["ours"][w], outs["diffusers"][w]
            diff = ((a - b).norm() / b.norm()).item()
        print(json.dumps({
            "summary": w, "config": args.config, "batch_size": args.batch_size,
            "threads": args.threads, "repeat": args.repeat, "ours_s": round(ours, 4),
            "diffusers_s": round(theirs, 4), "speedup": round(theirs / ours, 3),
            "ours_min_s": round(ours_min, 4), "diffusers_min_s": round(theirs_min, 4),
            "speedup_of_min": round(theirs_min / ours_min, 3),
            "output_rel_diff": diff,
        }), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    run_cli(main)
