"""
Upsample a batch of small samples (an npz from image_sample.py) with a super-resolution model and
save samples_NxHxWx3.npz plus a PNG grid.

    mpiexec -n N python scripts/super_res_sample.py --model_path upsampler.pt \
        --base_samples samples_Nx64x64x3.npz --large_size 256 --small_size 64 $MODEL_FLAGS
"""

import argparse

import numpy as np
import torch

from guided_diffusion.cli import run_config
from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import cfg_defaults, sampling_guidance_defaults
from guided_diffusion.diffusion.guidance import check_guidance_scale, classifier_free_guidance
from guided_diffusion.runtime.perf import set_tf32
from guided_diffusion.sampling.files import to_uint8
from guided_diffusion.errors import ScriptError
from guided_diffusion.sampling.loop import (
    gather_samples,
    output_dir,
    prepare_network,
    write_samples,
)
from guided_diffusion.cli.weights import load_checkpoint_into
from guided_diffusion.cli.flags import network_flags, sampling_extra_defaults
from guided_diffusion.cli.flags import sample_script_defaults
from guided_diffusion.sampling.files import read_low_res_images
from guided_diffusion.cli.main import run_main
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.sampling.loop import (
    check_sampler_flags,
    check_sampling_flags,
    make_sample_fn,
    resolve_sampler,
    sample_steps,
)
from guided_diffusion.sampling.loop import sample_shape


def main(argv=None):
    args = run_config.parse_args(create_argparser(), argv)  # flags from a run's args.json too
    check_sampling_flags(args)  # before any work: bad counts, an unwritable --out_dir

    sampler = resolve_sampler(args.sampler, args.use_ddim)
    check_sampler_flags(
        sampler, timestep_respacing=args.timestep_respacing, evaluations=args.evaluations,
        sigma_grid=args.sigma_grid,
    )
    check_guidance_scale(
        args.guidance_scale, class_cond=args.class_cond, class_dropout_prob=args.class_dropout_prob
    )
    dist_util.setup_dist()

    # The model is built, its checkpoint checked and the base samples read before the log
    # folder is made, so a run refused on its flags leaves no folder behind.
    flags = args_to_dict(args, sr_model_and_diffusion_defaults().keys())
    flags.update(
        num_classes=args.num_classes,
        channel_mult=args.channel_mult,
        class_dropout_prob=args.class_dropout_prob,
        in_channels=args.in_channels,
    )
    model, diffusion = sr_create_model_and_diffusion(**flags)
    sample_fn = make_sample_fn(sampler, diffusion, args.evaluations, args.sigma_grid, eta=args.eta)
    load_checkpoint_into(
        model, args.model_path, flags, build=lambda f: sr_create_model_and_diffusion(**f)[0]
    )
    data = load_data_for_worker(args.base_samples, args.batch_size, args.small_size, args.class_cond,
                                args.in_channels)
    logger.configure(dir=args.log_dir or None)
    set_tf32(args.tf32)
    logger.log(f"loaded the model {args.model_path} and the base samples {args.base_samples}")
    prepare_network(model, **network_flags(args))

    seed_sampling(args.seed)
    logger.log(f"creating samples with {sampler}...")
    # deviation from reference: the reference always used p_sample_loop, ignoring --use_ddim.
    # The low-resolution input is repeated for the unconditional half of guidance.
    model_fn = classifier_free_guidance(model, args.guidance_scale, null_label=args.num_classes)
    shape = sample_shape(args.batch_size, args.large_size, args.in_channels)

    def make_batch(bar):
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in next(data).items()}
        sample = sample_fn(
            model_fn,
            shape,
            clip_denoised=args.clip_denoised,
            model_kwargs=model_kwargs,
            device=dist_util.dev(),  # model_fn may be a plain function (guidance)
            progress=bar,
        )
        # deviation from reference: the labels of class-conditional runs are kept as arr_1.
        return to_uint8(sample.float()), model_kwargs.get("y")

    arr, labels = gather_samples(args.num_samples, args.batch_size, make_batch,
                                 progress=args.progress,
                                 steps_per_batch=sample_steps(sampler, diffusion, args.evaluations))
    write_samples(arr, labels, output_dir(args), save_images=args.save_images)
    logger.log("sampling complete")


def read_base_samples(base_samples, small_size, class_cond, in_channels=3):
    """
    :return: (uint8 images [N, small, small, C], int64 labels or None) from an image_sample
        npz, an image file or a folder of images (sampling.files.read_low_res_images).
    :raises ScriptError: when the file is missing, unreadable or holds the wrong shapes.
    """
    return read_low_res_images(base_samples, small_size, class_cond=class_cond,
                               channels=in_channels)


def load_data_for_worker(base_samples, batch_size, small_size, class_cond, in_channels=3):
    """
    An endless generator of {"low_res": float NCHW in [-1, 1], "y": labels} batches made of this
    rank's share (entries rank, rank + W, ...) of the base samples, cycling through them.
    """
    image_arr, label_arr = read_base_samples(base_samples, small_size, class_cond, in_channels)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    if len(range(rank, len(image_arr), world)) == 0:
        raise ScriptError(f"{base_samples} holds {len(image_arr)} images, fewer than {world} ranks")
    return _cycle_batches(image_arr, label_arr, batch_size, rank, world)


def _cycle_batches(image_arr, label_arr, batch_size, rank, world):
    buffer, label_buffer = [], []
    while True:
        for i in range(rank, len(image_arr), world):
            buffer.append(image_arr[i])
            if label_arr is not None:
                label_buffer.append(label_arr[i])
            if len(buffer) == batch_size:
                batch = torch.from_numpy(np.stack(buffer)).float() / 127.5 - 1.0
                res = {"low_res": batch.permute(0, 3, 1, 2)}
                if label_arr is not None:
                    res["y"] = torch.from_numpy(np.stack(label_buffer)).long()
                yield res
                buffer, label_buffer = [], []


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        base_samples="",
        model_path="",
    )
    defaults.update(sr_model_and_diffusion_defaults())
    defaults.update(sampling_extra_defaults())
    defaults.update(cfg_defaults())
    defaults.update(sampling_guidance_defaults())
    defaults.update(sample_script_defaults())
    defaults.update(channel_mult="")  # "" = by large_size; needed for sizes like 16
    parser = argparse.ArgumentParser(description="Upsample samples with a super-resolution model.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
