"""
Sample from a diffusion model guided by a noisy-image classifier (Dhariwal & Nichol 2021,
Algorithms 1 and 2) and save samples_NxHxWx3.npz (arr_1: the target labels) plus a PNG grid.

    mpiexec -n N python scripts/classifier_sample.py --model_path model.pt \
        --classifier_path classifier.pt --classifier_scale 1.0 $MODEL_FLAGS $CLASSIFIER_FLAGS
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
from guided_diffusion.diffusion.guidance import classifier_free_guidance, make_classifier_cond_fn
from guided_diffusion.runtime.seeding import seed_sampling
from guided_diffusion.sampling import latents, loop
from guided_diffusion.script_util import (
    classifier_defaults,
    model_and_diffusion_defaults,
    script_parser,
)


def main(argv=None):
    args = loop.parse_sampling_flags(create_argparser(), argv)
    sampler = loop.sampler_from_flags(args)
    dist_util.setup_dist()

    # Both networks are built and their checkpoints checked before the log folder is made, so
    # a run refused on its flags leaves no folder behind.
    next_labels = loop.class_labels(args)
    # The output folder is checked now: a finished result, another command's kept batches.
    guided_channels = latents.guidance_channel_count(args)
    decode = latents.latent_decoder(args)  # --vae_path: latents decoded to images
    out_size = decode.image_size(args.image_size) if decode else args.image_size
    kept = loop.keep_sample_rounds(args, __file__, out_size,
                                   channels=decode.channels if decode else None)
    model, diffusion, _ = loop.load_diffusion_model(args)
    sample_fn = loop.make_sample_fn(sampler, diffusion, args.evaluations, args.sigma_grid,
                                    eta=args.eta)
    classifier = loop.load_guidance_classifier(args)
    loop.open_run_log(
        args, model, f"loaded the model {args.model_path} and the classifier {args.classifier_path}"
    )

    cond_fn = make_classifier_cond_fn(classifier, args.classifier_scale)

    # Classifier-free guidance on top of classifier guidance; the model itself at scale 1.
    guided = classifier_free_guidance(model, args.guidance_scale, null_label=args.num_classes,
                                      channels=guided_channels)

    def model_fn(x, t, y=None):
        # The labels steer the classifier always, the diffusion model only when it is conditional.
        if args.class_cond:
            return guided(x, t, y=y)
        return model(x, t, None)

    seed_sampling(args.seed)
    logger.log(f"sampling with {sampler}...")
    steps = loop.sample_steps(sampler, diffusion, args.evaluations)
    loop.sample_and_write(args, sample_fn, steps, model_fn, lambda: {"y": next_labels()},
                          image_size=args.image_size, cond_fn=cond_fn, kept=kept,
                          streams={"labels": next_labels},
                          decode=decode and decode.to(dist_util.dev()))


def create_argparser():
    return script_parser(
        "Sample with classifier guidance.",
        dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="",
             classifier_path="", classifier_scale=1.0),
        model_and_diffusion_defaults(),
        classifier_defaults(),
        diffusion_sampling_defaults(),
        label_choice_defaults(),
        latent_defaults(),
        # Needed for classifiers at sizes without a built-in channel table (e.g. 16).
        dict(classifier_channel_mult=""),
    )


if __name__ == "__main__":
    run_main(main)
