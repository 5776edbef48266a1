"""
Time sampling of a named model config for a given respacing and print one JSON line per run:
{"bench": "sample", "config", "device", "respacing", "use_ddim", "images_per_s", "peak_mem_mb", ...}.
Weights are random (speed does not depend on them).

    python benchmarks/bench_sample.py --config tiny --timestep_respacing ddim10 --use_ddim True
    python benchmarks/bench_sample.py --config adm256 --device cuda --batch_size 16 \
        --timestep_respacing 250 --use_fp16 True
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cli import bench_device, print_runs, run_cli, timed  # noqa: E402
from bench_configs import CONFIGS, config_flags, run_record  # noqa: E402

from guided_diffusion.runtime.perf import compile_model, set_tf32, to_channels_last  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, str2bool  # noqa: E402


def run(args):
    device = bench_device(args.device)
    torch.manual_seed(0)
    flags = config_flags(args.config)
    flags.update(use_fp16=args.use_fp16, timestep_respacing=args.timestep_respacing)
    model, diffusion = create_model_and_diffusion(**flags)
    model.to(device)
    set_tf32(args.tf32, device)
    if args.use_fp16 and args.use_bf16:
        raise ValueError("--use_fp16 and --use_bf16 exclude each other: pick one")
    if args.use_fp16:
        model.convert_to_fp16()
    elif args.use_bf16:
        model.convert_to_bf16()
    model.eval()
    to_channels_last(model, args.channels_last)
    compile_model(model, args.compile)
    size = flags["image_size"]
    kwargs = {}
    if flags["class_cond"]:
        kwargs["y"] = torch.randint(0, flags["num_classes"], (args.batch_size,), device=device)
    loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    shape = (args.batch_size, 3, size, size)
    warmup = args.warmup if args.warmup >= 0 else int(args.compile)
    for _ in range(warmup):  # e.g. the compilation, outside the timing
        loop(model, shape, model_kwargs=kwargs, device=device)
    wall, cpu = timed(device, lambda: loop(model, shape, model_kwargs=kwargs, device=device))
    return run_record(
        "sample", args, model, device, respacing=args.timestep_respacing or "all",
        use_ddim=args.use_ddim, steps=diffusion.num_timesteps, seconds=wall, cpu_s=cpu,
        images_per_s=args.batch_size / wall,
        model_evals_per_s=args.batch_size * diffusion.num_timesteps / wall,
    )


def create_argparser():
    parser = argparse.ArgumentParser(description="Benchmark diffusion sampling.")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--timestep_respacing", default="ddim10")
    parser.add_argument("--use_ddim", type=str2bool, default=True)
    parser.add_argument("--use_fp16", type=str2bool, default=False)
    parser.add_argument("--use_bf16", type=str2bool, default=False)
    parser.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model")
    parser.add_argument("--channels_last", type=str2bool, default=False)
    parser.add_argument("--tf32", type=str2bool, default=True, help="CUDA: TF32 float32 matmuls")
    parser.add_argument("--warmup", type=int, default=-1,
                        help="untimed loops first (default: 1 with --compile, else 0)")
    parser.add_argument("--repeat", type=int, default=1, help="runs (one JSON line each)")
    return parser


def main(argv=None):
    print_runs(run, create_argparser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
