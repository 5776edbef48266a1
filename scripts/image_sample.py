"""
Generate a large batch of image samples from a model and save them as a large numpy array
(samples_NxHxWx3.npz, with the labels as arr_1 for class-conditional models) plus a PNG grid.

    mpiexec -n N python scripts/image_sample.py --model_path model.pt $MODEL_FLAGS $SAMPLE_FLAGS
"""

if __name__ == "__main__":
    # First, before the slow imports: a stop signal (SIGTERM, SIGUSR1, SIGINT) is recorded from
    # here on instead of killing the process; the run then stops after its current batch with
    # that batch kept (guided_diffusion/runtime/kept_rounds.py).
    from guided_diffusion.runtime.signals import catch_preemption_signals

    catch_preemption_signals()

from guided_diffusion import dist_util, logger
from guided_diffusion.cli.flags import (
    diffusion_sampling_defaults,
    label_choice_defaults,
    latent_defaults,
)
from guided_diffusion.cli.main import run_main
from guided_diffusion.diffusion.guidance import classifier_free_guidance
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling import latents, loop
from guided_diffusion.script_util import model_and_diffusion_defaults, script_parser


def main(argv=None):
    args = loop.parse_sampling_flags(create_argparser(), argv)
    sampler = loop.sampler_from_flags(args)
    dist_util.setup_dist()

    # The model is built and its checkpoint checked before the log folder is made, so a run
    # refused on its flags leaves no folder behind.
    next_labels = loop.class_labels(args, class_cond=args.class_cond)
    # The output folder is checked now: a finished result, another command's kept batches.
    guided_channels = latents.guidance_channel_count(args)
    decode = latents.latent_decoder(args)  # --vae_path: latents decoded to images
    out_size = decode.image_size(args.image_size) if decode else args.image_size
    kept = loop.keep_sample_rounds(args, __file__, out_size,
                                   channels=decode.channels if decode else None)
    model, diffusion, _ = loop.load_diffusion_model(args)
    sample_fn = loop.make_sample_fn(sampler, diffusion, args.evaluations, args.sigma_grid,
                                    eta=args.eta)
    loop.open_run_log(args, model, f"loaded the model {args.model_path}")

    seed_sampling(args.seed)
    logger.log(f"sampling with {sampler}...")
    # The null class is label num_classes; with --guidance_scale 1 this is the model itself.
    model_fn = classifier_free_guidance(model, args.guidance_scale, null_label=args.num_classes,
                                        channels=guided_channels)

    def batch_kwargs():
        # Labels are drawn before the batch's noise, as in the reference.
        return {"y": next_labels()} if args.class_cond else {}

    steps = loop.sample_steps(sampler, diffusion, args.evaluations)
    loop.sample_and_write(args, sample_fn, steps, model_fn, batch_kwargs,
                          image_size=args.image_size, kept=kept, streams={"labels": next_labels},
                          decode=decode and decode.to(dist_util.dev()))


def create_argparser():
    return script_parser(
        "Sample images from a diffusion model.",
        dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path=""),
        model_and_diffusion_defaults(),
        diffusion_sampling_defaults(),
        label_choice_defaults(),
        latent_defaults(),
    )


if __name__ == "__main__":
    run_main(main)
