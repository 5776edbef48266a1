"""
The flags the scripts add to the reference's, one function per family, each default keeping the
reference's behaviour; the reference's own families stay in script_util (model_and_diffusion_defaults
and its siblings). Also the parsing of list-valued flags.
"""

from ..script_util import classifier_defaults, model_and_diffusion_defaults


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
        **performance_defaults(),
    )


def ddim_tool_defaults(seed=True):
    """
    The flags of the DDIM tools (ddim_invert, ddim_interpolate, ddim_consistency): the model
    flags without --timestep_respacing (their --steps choose the respacing, "ddim<steps>"), plus
    sampling_extra_defaults() (without --seed when nothing is random) and --class_dropout_prob
    (so that checkpoints trained for classifier-free guidance load).
    """

    defaults = model_and_diffusion_defaults()
    del defaults["timestep_respacing"]
    defaults.update(cfg_defaults())
    extras = sampling_extra_defaults()
    if not seed:
        del extras["seed"]
    defaults.update(extras)
    return defaults


def ddim_tool_model_flags(args):
    """
    The create_model_and_diffusion flags (plus num_classes and class_dropout_prob) of a DDIM
    tool's parsed args.
    """

    keys = [k for k in model_and_diffusion_defaults() if k != "timestep_respacing"]
    flags = {k: getattr(args, k) for k in keys}
    flags.update(
        timestep_respacing="",
        num_classes=args.num_classes,
        class_dropout_prob=getattr(args, "class_dropout_prob", 0.0),
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
        seed=0, num_classes=1000, log_dir="", max_steps=0, use_bf16=False, **performance_defaults()
    )


def parse_step_counts(text):
    """
    Parse a comma-separated list of DDIM step counts, e.g. "10,20,50,100".

    :return: the counts as a sorted list of distinct positive ints.
    :raises ValueError: on an empty list or an entry that is not a positive integer.
    """
    counts = []
    for entry in str(text).split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry.startswith("ddim"):
            entry = entry[len("ddim"):]
        if not entry.isdigit() or int(entry) < 1:
            raise ValueError(f"step counts must be positive integers such as 10,20,50, got {text!r}")
        counts.append(int(entry))
    if not counts:
        raise ValueError(f"no step counts in {text!r}: pass e.g. --steps 10,20,50,100")
    return sorted(set(counts))


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
    defaults.update(sampling_guidance_defaults())
    return defaults

# Descriptions of the flags added by the sampling work (issues 20 and 24), merged into the one
# flag table for --help: {flag: (group, one-line description)}.
NEW_FLAG_HELP = {
    "evaluations": (
        "sampling",
        "model evaluations per sample for the ODE solvers (--sampler euler|heun|dpmpp_*); "
        "required with them, 0 with ddpm/ddim (they use --timestep_respacing)",
    ),
    "sigma_grid": (
        "sampling",
        "noise levels of the ODE solvers: karras, logsnr (uniform in log sigma) or time "
        "(uniform in timestep); empty = the solver's measured default",
    ),
    "mask": (
        "sampling",
        "image_inpaint.py: a mask PNG for every image, or a folder of masks named like the "
        "images; white = keep",
    ),
    "invert_mask": ("sampling", "image_inpaint.py: black = keep instead of white"),
    "jump_length": (
        "sampling",
        "image_inpaint.py: RePaint's jump, reverse steps run before noising back up (1 = "
        "every step)",
    ),
    "resamplings": (
        "sampling",
        "image_inpaint.py: RePaint's resampling, times each stretch of --jump_length steps is "
        "run (1 = none)",
    ),
    "edit_strength": (
        "sampling",
        "image_edit.py: SDEdit's t0 / T in (0, 1]: how far the input is noised before "
        "denoising (1 = sample from noise)",
    ),
    "class_label": (
        "sampling",
        "editing scripts: the class of class-conditional or classifier-guided edits (-1 = "
        "random, drawn as image_sample.py draws)",
    ),
}
