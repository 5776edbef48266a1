"""
Export a diffusion checkpoint to a Hugging Face diffusers folder.

    python scripts/export_diffusers.py --model_path runs/m/ema_0.9999_010000.pt --out_dir export
    python scripts/export_diffusers.py --model_path 256x256_diffusion.pt --out_dir adm256 $MODEL_FLAGS

Writes OUT/unet (diffusers.UNet2DModel; OUT/transformer, DiTTransformer2DModel, for a DiT) and
OUT/scheduler (DDPMScheduler), weights as safetensors. See docs/interop.md.
"""

from guided_diffusion.cli import run_config
from guided_diffusion.cli.flags import cfg_defaults, channel_defaults, output_defaults
from guided_diffusion.cli.main import run_main
from guided_diffusion.interop import diffusers_export
from guided_diffusion.script_util import model_and_diffusion_defaults, script_parser

DESCRIPTION = (
    "Export a diffusion checkpoint to a Hugging Face diffusers folder: OUT/unet, the UNet as "
    "diffusers.UNet2DModel (OUT/transformer, DiTTransformer2DModel, for a DiT checkpoint); "
    "OUT/scheduler, a DDPMScheduler with the model's betas, variance type (learned_range for "
    "--learn_sigma True) and prediction type; OUT/model_index.json (DDPMPipeline) for an "
    "unconditional UNet. Weights are written as safetensors, as float32. The model flags come "
    "from the args.json beside --model_path when there is one. Layouts diffusers cannot express "
    "(the noisy classifier, the super-resolution model, attention heads of different widths) "
    "are refused, never approximated."
)


def main(argv=None):
    args = run_config.parse_args(create_argparser(), argv)
    # The folder is checked before the checkpoint is read: a refusal costs nothing.
    diffusers_export.check_out_dir(args.out_dir, args.overwrite)
    diffusers_export.import_diffusers()
    model, diffusion = diffusers_export.load_for_export(args)
    files = diffusers_export.export_diffusers(model, diffusion, args.out_dir,
                                              overwrite=args.overwrite)
    print(f"exported {args.model_path} to {args.out_dir}: {', '.join(files)}")


def create_argparser():
    defaults = model_and_diffusion_defaults()
    # The exported scheduler is the training process; respacing is a choice of whoever samples.
    del defaults["timestep_respacing"]
    return script_parser(
        DESCRIPTION,
        dict(model_path="", out_dir="", num_classes=1000, config=""),
        defaults,
        channel_defaults(),
        cfg_defaults(),
        output_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
