"""
Write improved_diffusion_manifest.json: the state-dict layout (keys, shapes, parameter count) of
every checkpoint openai/improved-diffusion released, built by *their* code from the flags in
*their* README. tests/test_released.py builds the same checkpoints with this port's factories from
the flags in guided_diffusion/data/released.json and compares, so the two sides never share code.

Run once, from a checkout of openai/improved-diffusion (no weights, no network; the networks are
built on the meta device):

    git -C /work/.mirror/openai+improved-diffusion/repo archive HEAD | tar -x -C /tmp/id
    /work/venv-oracle/bin/python tests/data/make_improved_diffusion_manifest.py /tmp/id \
        > tests/data/improved_diffusion_manifest.json

The flags below are transcribed from their README ("Models and Hyperparameters"), in their
flag names and parsed with their own defaults (rescale_timesteps=True, ...).
"""

import argparse
import json
import sys

import torch

# layout name -> (their script's kind, the README's MODEL_FLAGS + DIFFUSION_FLAGS).
LAYOUTS = {
    "improved_imagenet64_uncond": ("unet", "--image_size 64 --num_channels 128 --num_res_blocks 3 "
                                           "--learn_sigma True --diffusion_steps 4000 "
                                           "--noise_schedule cosine"),
    "improved_cifar10_uncond": ("unet", "--image_size 32 --num_channels 128 --num_res_blocks 3 "
                                        "--learn_sigma True --dropout 0.3 --diffusion_steps 4000 "
                                        "--noise_schedule cosine"),
    "improved_imagenet64_cond": ("unet", "--image_size 64 --num_channels 192 --num_res_blocks 3 "
                                         "--learn_sigma True --class_cond True --diffusion_steps "
                                         "4000 --noise_schedule cosine --rescale_learned_sigmas "
                                         "False --rescale_timesteps False"),
    "improved_upsample_256": ("sr", "--num_channels 192 --num_res_blocks 2 --learn_sigma True "
                                    "--class_cond True --diffusion_steps 4000 --noise_schedule "
                                    "linear --rescale_learned_sigmas False --rescale_timesteps "
                                    "False"),
    "improved_lsun_256": ("unet", "--image_size 256 --num_channels 128 --num_res_blocks 2 "
                                  "--num_heads 1 --learn_sigma True --use_scale_shift_norm False "
                                  "--attention_resolutions 16 --diffusion_steps 1000 "
                                  "--noise_schedule linear --rescale_learned_sigmas False "
                                  "--rescale_timesteps False"),
}


def main():
    checkout = sys.argv[1]
    sys.path.insert(0, checkout)
    from improved_diffusion import script_util as su  # their code

    out = {"source": "openai/improved-diffusion README and improved_diffusion/script_util.py",
           "layouts": {}}
    for name, (kind, flags) in LAYOUTS.items():
        defaults = su.sr_model_and_diffusion_defaults() if kind == "sr" else su.model_and_diffusion_defaults()
        parser = argparse.ArgumentParser()
        su.add_dict_to_argparser(parser, defaults)
        args = parser.parse_args(flags.split())
        create = su.sr_create_model_and_diffusion if kind == "sr" else su.create_model_and_diffusion
        with torch.device("meta"):
            model, diffusion = create(**su.args_to_dict(args, defaults.keys()))
        out["layouts"][name] = {
            "kind": kind,
            "flags": flags,
            "num_timesteps": diffusion.num_timesteps,
            "rescale_timesteps": args.rescale_timesteps,
            "num_params": sum(p.numel() for p in model.parameters()),
            "state_dict": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        }
    json.dump(out, sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
