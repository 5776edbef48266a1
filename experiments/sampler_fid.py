"""
FID against the number of model evaluations for each sampler (and classifier-free guidance
scale) of a class-conditional model of small grayscale images such as the bundled digits.

    python experiments/sampler_fid.py --model_path ema_0.999_007000.pt --data_dir data/digits16 \
        --samplers ddim,euler,heun,dpmpp_2m --evaluations 5,10,20,50 --guidance_scales 1,3 \
        $MODEL_FLAGS

The features are the 64 penultimate activations of a small CNN trained here on the real images
(--data_dir, read as they are), FID from the project's evaluator maths; see
experiments/sampler_fid_lib.py. For every configuration the labels are balanced and the starting
noise is the same (drawn from a generator seeded with --seed). ddim and ddpm get --timestep_respacing N (N evenly spaced
steps); the ODE solvers get --evaluations N, their budget of model evaluations. Writes, in --out_dir
(default: the log folder): sampler_fid.json, sampler_fid.md (tables), sampler_fid.png (plot) and
grids/w<scale>_<sampler>_<N>.png (the first 100 samples of each configuration).
"""

import os

from guided_diffusion.cli import run_config
from guided_diffusion import logger
from guided_diffusion.diffusion.guidance import check_guidance_scale
from guided_diffusion.cli.flags import parse_step_counts
from guided_diffusion.image_datasets import read_image_folder
from sampler_fid_lib import check_budgets, real_reference, sweep, write_report
from guided_diffusion.errors import ScriptError
from guided_diffusion.cli.flags import ddim_tool_defaults, ddim_tool_model_flags
from guided_diffusion.sampling.loop import load_sampling_model
from guided_diffusion.sampling.loop import output_dir
from guided_diffusion.cli.main import open_tool_log, run_main, start_single_process_tool
from guided_diffusion.script_util import script_parser
from guided_diffusion.sampling.loop import SAMPLER_NAMES, resolve_sampler
from guided_diffusion.script_util import diffusion_from_flags


def main(argv=None):
    args = run_config.parse_args(create_argparser(), argv)  # flags from a run's args.json too
    names = [resolve_sampler(n.strip(), False) for n in args.samplers.split(",") if n.strip()]
    if not names:
        raise ScriptError(f"--samplers is empty: pass some of {', '.join(SAMPLER_NAMES)}")
    budgets = parse_step_counts(args.evaluations)
    check_budgets(names, budgets)
    scales = [float(s) for s in args.guidance_scales.split(",") if s.strip()]
    if not args.class_cond:
        raise ScriptError("sampler_fid.py measures class-conditional models: pass --class_cond True")
    if args.in_channels != 3:
        raise ScriptError("sampler_fid.py measures RGB models (its judge reads 3 channels): "
                          "drop --in_channels")
    for scale in scales:
        check_guidance_scale(scale, class_cond=True, class_dropout_prob=args.class_dropout_prob)
    if not args.data_dir:
        raise ScriptError("pass --data_dir, the folder of real images the model was trained on")

    start_single_process_tool("sampler_fid.py", args)
    open_tool_log(args)

    flags = ddim_tool_model_flags(args)
    model = load_sampling_model(flags, args.model_path)

    logger.log(f"training the feature classifier on the real images of {args.data_dir}...")
    images, labels = read_image_folder(args.data_dir, args.image_size, class_cond=True)
    reference = real_reference(images, labels, num_classes=args.num_classes,
                               num_samples=args.num_samples,
                               classifier_steps=args.classifier_steps, seed=args.seed)
    logger.log(f"real images: {len(images)}, classifier accuracy {reference['real_accuracy']:.3f},"
               f" FID of {reference['num_samples']} of them {reference['subset_fid']:.3f}")

    out = output_dir(args)
    rows = sweep(
        model, lambda respacing: diffusion_from_flags(flags, respacing), reference,
        samplers=names, evaluations=budgets, guidance_scales=scales,
        num_samples=args.num_samples, batch_size=args.batch_size, num_classes=args.num_classes,
        image_size=args.image_size, seed=args.seed, clip_denoised=args.clip_denoised,
        grid_dir=os.path.join(out, "grids"), log=logger.log, progress=args.progress,
    )
    text = write_report(rows, reference, out, title=os.path.basename(args.model_path))
    logger.log(text)
    logger.log(f"wrote sampler_fid.json, sampler_fid.md, sampler_fid.png and grids/ to {out}")


def create_argparser():
    defaults = dict(
        model_path="",
        data_dir="",
        samplers=",".join(n for n in SAMPLER_NAMES if n != "ddpm"),
        evaluations="5,10,20,50",
        guidance_scales="1",
        num_samples=1000,
        batch_size=500,
        classifier_steps=2000,
    )
    return script_parser("FID against model evaluations per sampler.", ddim_tool_defaults(),
                         defaults)


if __name__ == "__main__":
    run_main(main)
