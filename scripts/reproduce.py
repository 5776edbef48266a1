"""
Reproduce one row of the paper's results: sample the row's checkpoints with the paper's flags (on
every rank: mpiexec or torchrun), evaluate the samples against the row's reference batch, and
print the paper's figures beside ours. --list True names the rows.

    mpiexec -n 8 python scripts/reproduce.py --row adm_g_256 --checkpoint_dir models --ref_dir refs

Resumable: each sampling stage keeps its finished batches, so the same command continues a run
that was stopped (SIGTERM, SIGUSR1, Ctrl-C: exit status 75), and a stage whose samples are already
written is not sampled again. --num_samples, --timestep_respacing and --extra_flags shrink a run
for testing; the result is then not the paper's setting (docs/reproduce.md).
"""

if __name__ == "__main__":
    # First, before the slow imports: a stop signal is recorded from here on instead of killing
    # the process; the sampling stage then stops after its current batch with that batch kept.
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

import argparse
import importlib.util
import os

import torch

from guided_diffusion import dist_util
from guided_diffusion.cli.flags import add_flag, script_description
from guided_diffusion.cli.main import run_main
from guided_diffusion.evaluation.evaluator import Evaluator, default_inception_path, evaluate
from guided_diffusion.evaluation.inception import HOW_TO_GET_WEIGHTS, load_inception
from guided_diffusion.evaluation.reproduce import (
    compare_lines,
    fit_extra_flags,
    list_rows,
    plan_row,
)
from guided_diffusion.errors import ScriptError
from guided_diffusion.script_util import str2bool

SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def create_argparser():
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    add_flag(parser, "row", default="")
    add_flag(parser, "list", type=str2bool, default=False)
    add_flag(parser, "checkpoint_dir", default="models")
    add_flag(parser, "ref_dir", default=".")
    add_flag(parser, "ref_batch", default="")
    add_flag(parser, "out_dir", default="")
    add_flag(parser, "inception_path", default="")
    add_flag(parser, "num_samples", type=int, default=0)
    add_flag(parser, "timestep_respacing", default="")
    add_flag(parser, "batch_size", type=int, default=0)
    add_flag(parser, "extra_flags", default="")
    add_flag(parser, "device", default="")
    return parser


def sampling_script(name):
    """A sampling script of this folder as a module (its main runs in this process)."""
    path = os.path.join(SCRIPTS, name)
    spec = importlib.util.spec_from_file_location(f"_reproduce_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.list:
        print("\n".join(list_rows()))
        return
    plan = plan_row(args.row, checkpoint_dir=args.checkpoint_dir, ref_dir=args.ref_dir,
                    ref_batch=args.ref_batch, out_dir=args.out_dir, num_samples=args.num_samples,
                    timestep_respacing=args.timestep_respacing, batch_size=args.batch_size,
                    extra_flags=args.extra_flags)
    weights = args.inception_path or default_inception_path()
    if not weights or not os.path.isfile(weights):
        raise ScriptError(f"--inception_path {weights or '(none found)'}: {HOW_TO_GET_WEIGHTS}")
    load_inception(weights)  # a wrong file is refused now, not after days of sampling
    modules = [sampling_script(stage["script"]) for stage in plan.stages]
    fit_extra_flags(plan, [module.create_argparser() for module in modules])
    for stage, module in zip(plan.stages, modules):
        if os.path.isfile(stage["npz"]):
            dist_util.print0(f"{stage['npz']} is already sampled: reused")
            continue
        dist_util.print0(f"sampling: python scripts/{stage['script']} {' '.join(stage['args'])}")
        module.main(stage["args"])
    dist_util.setup_dist()
    if not dist_util.is_main_process():
        return  # rank 0 evaluates
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    evaluator = Evaluator(model=load_inception(weights, device=device), device=device)
    ours = evaluate(ref_batch=plan.ref_batch, sample_batch=plan.samples, evaluator=evaluator)
    print("\n".join(compare_lines(plan, ours)), flush=True)


if __name__ == "__main__":
    run_main(main)
