"""
Approximate the bits per dimension of a dataset under a diffusion model (the full variational
bound, every step) and save the per-step terms: vb_terms.npz, mse_terms.npz, xstart_mse_terms.npz.

    mpiexec -n N python scripts/image_nll.py --data_dir DIR --model_path model.pt $MODEL_FLAGS
"""

import os

import numpy as np
import torch.distributed as dist

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import arch_defaults, channel_defaults, sampling_extra_defaults
from guided_diffusion.cli.main import run_main
from guided_diffusion.image_datasets import load_data
from guided_diffusion.runtime.files import atomic_write
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling import loop
from guided_diffusion.script_util import model_and_diffusion_defaults, script_parser


def main(argv=None):
    args = loop.parse_sampling_flags(create_argparser(), argv)
    dist_util.setup_dist()

    # The model is built, its checkpoint checked and the data found before the log folder is
    # made, so a run refused on its flags leaves no folder behind.
    model, diffusion, _ = loop.load_diffusion_model(args)
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
        in_channels=args.in_channels,
    )
    loop.open_run_log(
        args, model, f"loaded the model {args.model_path} and the data {args.data_dir}"
    )

    seed_sampling(args.seed)
    logger.log("evaluating...")
    run_bpd_evaluation(model, diffusion, data, args.num_samples, args.clip_denoised,
                       loop.output_dir(args), args.progress)


def _mean_over_ranks(tensor):
    tensor = tensor / dist_util.get_world_size()
    if dist_util.is_distributed():
        dist.all_reduce(tensor)
    return tensor


def run_bpd_evaluation(model, diffusion, data, num_samples, clip_denoised, out_dir, progress=False):
    """
    Average calc_bpd_loop over batches until num_samples images (over all ranks) are done; log
    the running bpd and write the mean per-step terms on rank 0.
    """
    all_bpd = []
    all_metrics = {"vb": [], "mse": [], "xstart_mse": []}
    num_complete = 0
    while num_complete < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(dist_util.dev())
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in model_kwargs.items()}
        minibatch_metrics = diffusion.calc_bpd_loop(
            model,
            batch,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            progress=progress and dist_util.is_main_process(),
        )
        for key, term_list in all_metrics.items():
            terms = _mean_over_ranks(minibatch_metrics[key].mean(dim=0))
            term_list.append(terms.detach().cpu().numpy())
        all_bpd.append(_mean_over_ranks(minibatch_metrics["total_bpd"].mean()).item())
        num_complete += dist_util.get_world_size() * batch.shape[0]
        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd)}")

    if dist_util.is_main_process():
        for name, terms in all_metrics.items():
            out_path = os.path.join(out_dir, f"{name}_terms.npz")
            logger.log(f"saving {name} terms to {out_path}")
            mean_terms = np.mean(np.stack(terms), axis=0)
            # Atomically: a run killed while writing leaves the earlier file or none.
            atomic_write(out_path, lambda f, a=mean_terms: np.savez(f, a))
    dist_util.barrier()
    logger.log("evaluation complete")
    return float(np.mean(all_bpd))


def create_argparser():
    return script_parser(
        "Bits per dimension of a dataset under a model.",
        dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path=""),
        model_and_diffusion_defaults(),
        sampling_extra_defaults(),
        channel_defaults(),
        arch_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
