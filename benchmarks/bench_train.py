"""
Time training steps of a named model config and print one JSON line per run:
{"bench": "train", "config", "device", "batch_size", "use_fp16", "steps", "samples_per_s",
 "s_per_step", "peak_mem_mb", ...}.

    python benchmarks/bench_train.py --config tiny --batch_size 4 --steps 5
    python benchmarks/bench_train.py --config adm256 --device cuda --batch_size 8 --use_fp16 True
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cli import bench_device, print_runs, run_cli, timed  # noqa: E402
from bench_configs import CONFIGS, config_flags, run_record  # noqa: E402

from guided_diffusion import logger  # noqa: E402
from guided_diffusion.runtime.perf import compile_model, set_tf32, to_channels_last  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, str2bool  # noqa: E402
from guided_diffusion.train_util import TrainLoop  # noqa: E402


def synthetic_data(batch_size, image_size, num_classes, class_cond, device):
    gen = torch.Generator().manual_seed(0)
    while True:
        x = torch.rand(batch_size, 3, image_size, image_size, generator=gen) * 2 - 1
        cond = {"y": torch.randint(0, num_classes, (batch_size,), generator=gen)} if class_cond else {}
        yield x, cond


def run(args):
    device = bench_device(args.device)
    torch.manual_seed(0)
    flags = config_flags(args.config)
    flags["use_fp16"] = args.use_fp16
    model, diffusion = create_model_and_diffusion(**flags)
    model.to(device)
    set_tf32(args.tf32, device)
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)
    logger.configure(dir=args.log_dir, format_strs=["log"])
    # TrainLoop moves batches to dist_util.dev(), which is this device on a single process.
    loop = TrainLoop(
        model=model, diffusion=diffusion,
        data=synthetic_data(args.batch_size, flags["image_size"], flags["num_classes"],
                            flags["class_cond"], device),
        batch_size=args.batch_size, microbatch=args.microbatch, lr=1e-4, ema_rate="0.9999",
        log_interval=10**9, save_interval=10**9, resume_checkpoint="", use_fp16=args.use_fp16,
        use_bf16=args.use_bf16,
    )

    def run_steps(count):
        for _ in range(count):
            batch, cond = next(loop.data)
            loop.run_step(batch, cond)
            logger.getkvs().clear()

    run_steps(args.warmup)
    wall, cpu = timed(device, lambda: run_steps(args.steps))
    return run_record(
        "train", args, model, device, steps=args.steps, s_per_step=wall / args.steps,
        samples_per_s=args.batch_size * args.steps / wall, cpu_s=cpu,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )


def create_argparser():
    parser = argparse.ArgumentParser(description="Benchmark diffusion training steps.")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--microbatch", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--use_fp16", type=str2bool, default=False)
    parser.add_argument("--use_bf16", type=str2bool, default=False)
    parser.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model")
    parser.add_argument("--channels_last", type=str2bool, default=False)
    parser.add_argument("--tf32", type=str2bool, default=True, help="CUDA: TF32 float32 matmuls")
    parser.add_argument("--repeat", type=int, default=1, help="runs (one JSON line each)")
    parser.add_argument("--log_dir", default=os.path.join(os.getcwd(), "runs", "bench"))
    return parser


def main(argv=None):
    print_runs(run, create_argparser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
