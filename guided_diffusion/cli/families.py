"""
Every flag family of the scripts: a function returning {flag: default} for one concern (the
diffusion, the network, sampling, training, the run, ...), which a script merges into its
parser with script_util.add_dict_to_argparser, and the two helpers that turn parsed flags back
into factory keywords (ddim_tool_model_flags, network_flags).

The reference's four families (diffusion_defaults, model_and_diffusion_defaults,
classifier_defaults, classifier_and_diffusion_defaults) keep its defaults exactly and are
re-exported by script_util under their reference names; every family the port adds keeps the
reference's behaviour at its defaults. What each flag means is cli/help_table.py's.
"""


# ---------------------------------------------------------------------- the reference's families
# They lived in script_util in the reference; they are here so that the flag modules need
# nothing from script_util (which imports them).


def diffusion_defaults():
    """
    :return: defaults of the diffusion flags shared by image and classifier training.
    """
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    """
    :return: defaults of the noisy-classifier flags.
    """
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def model_and_diffusion_defaults():
    """
    :return: defaults of the UNet and diffusion flags for image training and sampling.
    """
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    """
    :return: defaults of the classifier and diffusion flags for classifier training.
    """
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


# ---------------------------------------------------------------------- the port's families


def sampling_extra_defaults():
    """
    Flags the sampling scripts add to the reference's; each default keeps reference behaviour.

    seed: torch.manual_seed(seed + rank) right before the sampling loop.
    num_classes: label count of class-conditional models and classifiers (reference: 1000).
    log_dir: the logger's folder ("" = $OPENAI_LOGDIR, else a dated temp folder).
    out_dir: where the npz files go ("" = the log folder, as the reference).
    progress: progress bars on rank 0.
    use_bf16: the networks' torsos in bfloat16 (like use_fp16).
    compile, tf32, channels_last: see perf_util.performance_defaults().
    """
    return dict(
        seed=0, num_classes=1000, log_dir="", out_dir="", progress=True, use_bf16=False,
        config="", **performance_defaults(),
    )


def ddim_tool_defaults(seed=True):
    """
    The flags of the DDIM tools (ddim_invert, ddim_interpolate, ddim_consistency): the model
    flags without --timestep_respacing (their --steps choose the respacing, "ddim<steps>"), plus
    sampling_extra_defaults() (without --seed when nothing is random) and --class_dropout_prob
    (so that checkpoints trained for classifier-free guidance load), --in_channels, and the flags
    every tool has: --model_path, --batch_size and --clip_denoised.
    """

    defaults = dict(model_path="", batch_size=16, clip_denoised=True)
    defaults.update(model_and_diffusion_defaults())
    defaults.update(channel_defaults())
    del defaults["timestep_respacing"]
    defaults.update(cfg_defaults())
    defaults.update(arch_defaults())
    extras = sampling_extra_defaults()
    if not seed:
        del extras["seed"]
    defaults.update(extras)
    return defaults


def ddim_tool_model_flags(args):
    """
    The create_model_and_diffusion flags (plus num_classes, class_dropout_prob and in_channels)
    of a DDIM tool's parsed args.
    """

    keys = [k for k in model_and_diffusion_defaults() if k != "timestep_respacing"]
    flags = {k: getattr(args, k) for k in keys}
    flags.update(
        timestep_respacing="",
        num_classes=args.num_classes,
        class_dropout_prob=getattr(args, "class_dropout_prob", 0.0),
        in_channels=getattr(args, "in_channels", 3),
        **{k: getattr(args, k) for k in arch_defaults() if hasattr(args, k)},
    )
    return flags


def network_flags(args):
    """The prepare_network keywords a sampling script's parsed flags give for its main network."""
    return dict(
        use_fp16=args.use_fp16,
        use_bf16=args.use_bf16,
        compile=args.compile,
        channels_last=args.channels_last,
    )


def cfg_defaults():
    """
    Flags of classifier-free guidance.

    class_dropout_prob: rate at which training replaces labels by the null class; > 0 gives the
        label embedding one more row (the null class, index num_classes). Pass the training
        value when sampling too: it describes the checkpoint's layout, like --learn_sigma.
    """
    return dict(class_dropout_prob=0.0)


def arch_defaults():
    """
    The diffusion network family (create_model's one switch; docs/dit.md).

    arch: "unet" (the reference's network, and what its flags and checkpoints describe) or
        "dit".
    dit_model: the DiT's size with --arch dit: one of the paper's twelve ("DiT-S/2" ...
        "DiT-XL/8"; DiT-XL/2 is the released one) or "depth=D,width=W,heads=H,patch=P".
    """
    return dict(arch="unet", dit_model="DiT-XL/2")


def latent_defaults():
    """
    Sampling a latent DiT (the released ones work on Stable Diffusion VAE latents).

    vae_path: a local diffusers AutoencoderKL folder (config.json + weights) to decode the
        sampled latents with; "" writes the latents as they are.
    guidance_channels: which channels classifier-free guidance extrapolates: "all" (the
        default) or "first3" (the first three only, as DiT's own sample.py does).
    """
    return dict(vae_path="", guidance_channels="all")


def sampling_guidance_defaults():
    """
    Flags of the sampling scripts for guidance and solver choice.

    guidance_scale: w of classifier-free guidance; 1 = plain conditional sampling (no extra
        model evaluation), 0 = unconditional, > 1 = stronger conditioning.
    sampler: "" (ddim when --use_ddim True, else ddpm) or one of sampling.loop.SAMPLER_NAMES.
    evaluations: the ODE solvers' model evaluations per sample (required with them; 0 with
        ddpm and ddim, whose steps --timestep_respacing chooses).
    sigma_grid: the solvers' noise levels, karras, logsnr or time ("" = each solver's default).
    """
    return dict(guidance_scale=1.0, sampler="", evaluations=0, sigma_grid="")


def performance_defaults():
    """
    Flags the training and sampling scripts add for speed; the defaults keep reference results
    on CPU.

    compile: torch.compile the networks' forward passes (eager fallback with one logged line).
    tf32: on CUDA, let float32 matmuls and convolutions use TF32 tensor cores.
    channels_last: keep 2-D activations and convolution weights in channels-last (NHWC) memory.
    """
    return dict(compile=False, tf32=True, channels_last=False)


def channel_defaults():
    """
    in_channels: channels of the images a diffusion model or classifier works on: 3 (RGB, the
        reference's only value and what the released checkpoints need), 1 for grey data, any
        count for .npy data.
    """
    return dict(in_channels=3)


def sample_script_defaults():
    """
    Flags of the three diffusion sampling scripts (image_sample, classifier_sample,
    super_res_sample) for what they write and how DDIM runs; each default keeps the reference's
    output.

    save_images: also write one PNG per sample beside the npz.
    eta: DDIM's eta (0 = deterministic); the ddim sampler only.
    in_channels: see channel_defaults().
    overwrite: see output_defaults().
    """
    return dict(save_images=False, eta=0.0, **channel_defaults(), **output_defaults())


def output_defaults():
    """
    Flags of the scripts that keep their batches while they run (runtime.kept_rounds).

    overwrite: replace a finished result in the output folder, and discard the kept batches of
        another command there; False (the default) refuses both, naming this flag.
    """
    return dict(overwrite=False)


def label_choice_defaults():
    """
    Which classes image_sample and classifier_sample draw. The defaults draw them at random
    before each batch's noise, as the reference does.

    class_label: every sample of this class (-1 = no fixed class).
    balanced_labels: classes in turn, so every class gets the same count.
    """
    return dict(class_label=-1, balanced_labels=False)


def diffusion_sampling_defaults():
    """
    The flags the three diffusion sampling scripts (image_sample, classifier_sample,
    super_res_sample) add to their networks' flags: sampling_extra_defaults(), cfg_defaults(),
    sampling_guidance_defaults() and sample_script_defaults(), in that order.
    """
    return {
        **sampling_extra_defaults(),
        **cfg_defaults(),
        **arch_defaults(),
        **sampling_guidance_defaults(),
        **sample_script_defaults(),
    }


def augmentation_defaults():
    """
    image_train.py's data augmentation: random_flip as the reference (on), random_crop off (the
    reference's load_data had it, but only classifier_train turned it on).
    """
    return dict(random_flip=True, random_crop=False)


def training_extra_defaults():
    """
    Flags the training scripts add to the reference's; each default keeps reference behaviour.

    seed: torch/numpy/random are seeded with seed + rank (timesteps, noise, data order).
    num_classes: label count of class-conditional models (the reference fixes 1000).
    log_dir: where logs and checkpoints go ("" = $OPENAI_LOGDIR, else a dated temp folder).
    max_steps: stop after this many steps of this run (0 = no limit).
    use_bf16: the torso in bfloat16 with float32 master weights (no loss scaling).
    compile, tf32, channels_last: see perf_util.performance_defaults().
    """
    return dict(
        seed=0, num_classes=1000, log_dir="", max_steps=0, use_bf16=False, **performance_defaults(),
        **run_defaults(),
    )


def run_defaults():
    """
    Flags every training script adds for living with a run (docs/runs.md); the defaults keep
    the reference's behaviour.

    log_format: rank 0's log outputs, e.g. "stdout,log,csv,tensorboard" ("" = $OPENAI_LOG_FORMAT,
        else stdout,log,csv).
    keep_checkpoints: keep the newest K checkpoint sets (-1 = all).
    lr_warmup_steps, lr_schedule: the learning-rate schedule (training.options.LRSchedule); 0
        and constant keep the reference's rate.
    """
    return dict(log_format="", keep_checkpoints=-1, lr_warmup_steps=0, lr_schedule="constant")


def diffusion_run_defaults():
    """
    The run features of the diffusion training scripts (image_train, super_res_train) beyond
    run_defaults(); each default keeps the reference's behaviour (docs/runs.md).

    ema_warmup_power, ema_inv_gamma: warm-up of the EMA decay (0 = none).
    grad_clip: clip the global gradient norm to this (0 = never).
    init_checkpoint, init_num_classes, init_add_null_class: fine-tune a checkpoint.
    sample_interval, sample_steps: a grid of EMA samples every N steps (0 = never), DDIM steps.
    val_data_dir, val_interval, val_num_images: validation loss terms on a fixed subset.
    save_format: the model and EMA files as "pt" (torch.save) or "safetensors".
    """
    return dict(
        ema_warmup_power=0.0,
        ema_inv_gamma=1.0,
        grad_clip=0.0,
        init_checkpoint="",
        init_num_classes=0,
        init_add_null_class=False,
        sample_interval=0,
        sample_steps=25,
        val_data_dir="",
        val_interval=1000,
        val_num_images=256,
        save_format="pt",
    )


def fid_train_defaults():
    """
    The proxy FID of image_train.py (guided_diffusion/training/fid.py, docs/training.md): every
    fid_interval steps (0 = never) fid_samples EMA samples, drawn with fid_steps DDIM steps from
    fixed noise, are compared with the reference batch fid_ref through the Inception weights of
    inception_path ("" = where evaluations/evaluator.py looks for them).
    """
    return dict(fid_interval=0, fid_ref="", fid_samples=1000, fid_steps=25, inception_path="")


def classifier_train_defaults():
    """
    The flags of classifier_train.py besides the classifier and diffusion flags: the
    reference's (data_dir ... save_interval) with its defaults, then the port's additions.
    """
    defaults = dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
    )
    extras = training_extra_defaults()
    del extras["use_bf16"]  # the classifier trains in fp32 or fp16 (--classifier_use_fp16)
    defaults.update(extras)
    defaults.update(classifier_channel_mult="", grad_clip=0.0, init_checkpoint="",
                    init_num_classes=0, save_format="pt")
    defaults.update(channel_defaults())
    return defaults


def diffusion_train_defaults():
    """
    The training flags of image_train.py and super_res_train.py with the reference's defaults
    (the model and diffusion flags come from script_util), then the port's additions:
    training_extra_defaults(), classifier-free guidance's class_dropout_prob and in_channels.
    """
    defaults = dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",  # a modelNNNNNN.pt file, or "auto"
        use_fp16=False,
        fp16_scale_growth=1e-3,
    )
    defaults.update(training_extra_defaults())
    defaults.update(cfg_defaults())
    defaults.update(arch_defaults())
    defaults.update(channel_defaults())
    defaults.update(diffusion_run_defaults())
    return defaults


def editing_defaults():
    """
    Flags of the editing scripts (image_inpaint.py, image_edit.py) besides the model's: the
    sampling scripts' extras, guidance and sampler flags, the classifier's flags (a classifier
    guides only with --classifier_path), and

    input: the image file or folder to edit.
    class_label: the class of class-conditional or classifier-guided edits (-1 = random).
    """
    defaults = dict(
        input="",
        model_path="",
        clip_denoised=True,
        batch_size=16,
        use_ddim=False,
        class_label=-1,
        classifier_path="",
        classifier_scale=1.0,
        classifier_channel_mult="",
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    defaults.update(sampling_extra_defaults())
    defaults.update(cfg_defaults())
    defaults.update(arch_defaults())
    defaults.update(sampling_guidance_defaults())
    defaults.update(output_defaults())
    return defaults
