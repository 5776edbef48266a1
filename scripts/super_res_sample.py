"""
Upsample a batch of small samples (an npz from image_sample.py) with a super-resolution model and
save samples_NxHxWx3.npz plus a PNG grid.

    mpiexec -n N python scripts/super_res_sample.py --model_path upsampler.pt \
        --base_samples samples_Nx64x64x3.npz --large_size 256 --small_size 64 $MODEL_FLAGS
"""

if __name__ == "__main__":
    # First, before the slow imports: a stop signal (SIGTERM, SIGUSR1, SIGINT) is recorded from
    # here on instead of killing the process; the run then stops after its current batch with
    # that batch kept (guided_diffusion/runtime/kept_rounds.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()


import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import diffusion_sampling_defaults
from guided_diffusion.cli.main import run_main
from guided_diffusion.diffusion.guidance import classifier_free_guidance
from guided_diffusion.errors import ScriptError
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling import loop
from guided_diffusion.sampling.files import read_low_res_images
from guided_diffusion.script_util import script_parser, sr_model_and_diffusion_defaults


def main(argv=None):
    args = loop.parse_sampling_flags(create_argparser(), argv)
    sampler = loop.sampler_from_flags(args)
    dist_util.setup_dist()
    # The output folder is checked now: a finished result, another command's kept batches.
    kept = loop.keep_sample_rounds(args, __file__, args.large_size)

    # The model is built, its checkpoint checked and the base samples read before the log
    # folder is made, so a run refused on its flags leaves no folder behind.
    model, diffusion, _ = loop.load_diffusion_model(args, super_res=True)
    sample_fn = loop.make_sample_fn(sampler, diffusion, args.evaluations, args.sigma_grid,
                                    eta=args.eta)
    data = load_data_for_worker(args.base_samples, args.batch_size, args.small_size, args.class_cond,
                                args.in_channels)
    loop.open_run_log(
        args, model, f"loaded the model {args.model_path} and the base samples {args.base_samples}"
    )

    seed_sampling(args.seed)
    logger.log(f"creating samples with {sampler}...")
    # deviation from reference: the reference always used p_sample_loop, ignoring --use_ddim.
    # The low-resolution input is repeated for the unconditional half of guidance.
    model_fn = classifier_free_guidance(model, args.guidance_scale, null_label=args.num_classes)
    steps = loop.sample_steps(sampler, diffusion, args.evaluations)

    def batch_kwargs():
        # deviation from reference: the labels of class-conditional runs are kept as arr_1.
        return {k: v.to(dist_util.dev()) for k, v in next(data).items()}

    loop.sample_and_write(args, sample_fn, steps, model_fn, batch_kwargs,
                          image_size=args.large_size, kept=kept, streams={"base_samples": data})


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
    return CycledBatches(image_arr, label_arr, batch_size, rank, world)


class CycledBatches:
    """
    The endless {"low_res", "y"} batches of one rank: its share of the base samples (entries
    rank, rank + W, ...), batch_size at a time, starting over at the end. Its position is saved
    with every kept round (state_dict), so a resumed run upsamples the same images.
    """

    def __init__(self, image_arr, label_arr, batch_size, rank, world):
        self.image_arr, self.label_arr = image_arr, label_arr
        self.indices = np.arange(rank, len(image_arr), world)
        self.batch_size = batch_size
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self):
        # Batch k holds entries k * batch_size ... of this rank's share, cycled.
        positions = (self.batches * self.batch_size + np.arange(self.batch_size)) % len(self.indices)
        chosen = self.indices[positions]
        self.batches += 1
        batch = torch.from_numpy(self.image_arr[chosen]).float() / 127.5 - 1.0
        res = {"low_res": batch.permute(0, 3, 1, 2)}
        if self.label_arr is not None:
            res["y"] = torch.from_numpy(np.asarray(self.label_arr[chosen])).long()
        return res

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = int(state["batches"])


def create_argparser():
    return script_parser(
        "Upsample samples with a super-resolution model.",
        dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, base_samples="",
             model_path=""),
        sr_model_and_diffusion_defaults(),
        diffusion_sampling_defaults(),
        dict(channel_mult=""),  # "" = by large_size; needed for sizes like 16
    )


if __name__ == "__main__":
    run_main(main)
