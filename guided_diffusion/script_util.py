"""
Factories that turn command-line flags into networks and diffusion processes, the flag defaults of
the scripts, and the small argparse helpers the scripts share.

The defaults dictionaries are those of the reference scripts, unchanged, so flags written for the
reference (and the released checkpoints) keep their meaning; they are defined in cli/families.py with
the port's own families and importable from here under the reference's names. `num_classes` is an
extra keyword of the factories; scripts add their own --num_classes flag.
"""

import argparse
import inspect

from . import gaussian_diffusion as gd
from .diffusion.guidance import check_class_dropout_prob, label_rows
from .respace import SpacedDiffusion, space_timesteps
from .cli.flags import add_flag
from .cli.flags import (  # noqa: F401  (the reference's names, defined with the other families)
    classifier_and_diffusion_defaults,
    classifier_defaults,
    diffusion_defaults,
    model_and_diffusion_defaults,
)
from .cli.hints import explain_state_dict_mismatch  # noqa: F401  (public here)
from .dit import dit_model as _dit_model
from .runtime.shapes import format_image_size, image_hw, parse_image_size, short_side
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# Channel multipliers per level chosen by image size when --channel_mult is empty.
# deviation from reference: 32 is added (the reference rejects it).
_CHANNEL_MULT_BY_SIZE = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}

# The super-resolution models use their own table for the sizes the reference supports.
_SR_CHANNEL_MULT_BY_SIZE = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
}
# deviation from reference: sizes outside the super-resolution table (e.g. 128, 32) fall back to
# the image-model table instead of being rejected.
_SR_CHANNEL_MULT_WITH_FALLBACK = {**_CHANNEL_MULT_BY_SIZE, **_SR_CHANNEL_MULT_BY_SIZE}


def sr_model_and_diffusion_defaults():
    """
    :return: defaults of the super-resolution model and diffusion flags: the image-model defaults
        restricted to what sr_create_model_and_diffusion takes, plus large_size and small_size.
    """
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    accepted = inspect.signature(sr_create_model_and_diffusion).parameters
    # The keywords the port adds to the reference's factory are not reference flags.
    added = ("num_classes", "class_dropout_prob", "channel_mult", "in_channels", "arch")
    return {k: v for k, v in res.items() if k in accepted and k not in added}


def _parse_channel_mult(channel_mult, image_size, table, size_flag):
    """
    :param channel_mult: "" (pick by size), a comma-separated string, or a sequence of numbers.
    :param image_size: an int, or (height, width): a rectangle picks by its shorter side.
    :return: a tuple of multipliers.
    """
    image_size = short_side(image_size)
    if isinstance(channel_mult, str):
        if channel_mult.strip() == "":
            if image_size not in table:
                sizes = ", ".join(str(s) for s in sorted(table))
                raise ValueError(
                    f"unsupported {size_flag} {image_size} with no channel_mult (built-in sizes: "
                    f"{sizes}): pass --channel_mult, e.g. --channel_mult 1,2,2,2"
                )
            return table[image_size]
        try:
            # deviation from reference: fractional entries (e.g. "0.5,1,1") are accepted, as in
            # the 512x512 table; the reference parses integers only.
            return tuple(_number(part) for part in channel_mult.split(","))
        except ValueError:
            raise ValueError(
                f"channel_mult must be comma-separated numbers like 1,2,2,2, got {channel_mult!r}"
            ) from None
    return tuple(channel_mult)


def check_size_fits_levels(size, channel_mult, size_flag="--image_size",
                           mult_flag="--channel_mult"):
    """
    Each level of channel_mult but the last halves the feature maps, and the UNet's way up
    joins them with the way down: every side must halve evenly that many times, or the first
    forward pass fails deep inside torch (e.g. --image_size 7 with --channel_mult 1,2).

    :param size: the image side, or (height, width) for a rectangle.
    :param channel_mult: the parsed multipliers (one per level).
    :raises ValueError: naming the sizes that work.
    """
    # deviation from reference: the reference builds such a network and fails in its first
    # forward pass (a tensor size mismatch where the way up meets the way down).
    halvings = len(channel_mult) - 1
    step = 2 ** halvings
    sides = image_hw(size)
    bad = [side for side in sides if side < 1 or side % step]
    if not bad:
        return
    side = bad[0]
    fits = " or ".join(str(n) for n in (side - side % step, side - side % step + step) if n >= step)
    mult = ",".join(str(m) for m in channel_mult)
    if sides[0] == sides[1]:
        need = f"the size must be a multiple of {step}: pass {size_flag} {fits}"
    else:
        need = f"every side must be divisible by {step} ({side} is not): pass sides of {fits}"
    raise ValueError(
        f"{size_flag} {format_image_size(size)} does not fit {mult_flag} {mult}: its "
        f"{len(channel_mult)} levels halve the image {halvings} time(s), so {need}, "
        f"or a {mult_flag} with fewer levels"
    )


def _number(text):
    value = float(text)
    return int(value) if value.is_integer() else value


def _attention_ds(attention_resolutions, image_size):
    """
    Turn attention resolutions (feature-map sizes) into downsample rates image_size // r.

    A rectangle counts by its shorter side: "16" on a 32x64 image means attention at
    downsample rate 2, where the feature map is 16x32 (an addition; the reference is square).

    :param attention_resolutions: a comma-separated string or a sequence of ints.
    :param image_size: an int, or (height, width).
    """
    image_size = short_side(image_size)
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                "attention_resolutions must be comma-separated integers like 16,8, got "
                f"{attention_resolutions!r}"
            ) from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    if any(r <= 0 for r in resolutions):
        raise ValueError(f"attention resolutions must be positive, got {attention_resolutions!r}")
    return tuple(image_size // r for r in resolutions)


def _check_num_classes(num_classes):
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")


def _check_in_channels(in_channels):
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.0,
    in_channels=3,
    arch="unet",
    dit_model="DiT-XL/2",
):
    """
    Build a UNet (or, with arch="dit", a DiT) and its diffusion from the flags of
    model_and_diffusion_defaults().

    :param num_classes: number of classes when class_cond (extra to the reference).
    :param class_dropout_prob: see create_model (extra to the reference).
    :param in_channels: see create_model (extra to the reference).
    :param arch: see create_model (extra to the reference).
    :param dit_model: see create_model (extra to the reference).
    :return: (UNetModel or DiT, SpacedDiffusion).
    """
    return _network_and_diffusion(create_model, locals())


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.0,
    in_channels=3,
    arch="unet",
    dit_model="DiT-XL/2",
):
    """
    Build the diffusion network (in_channels inputs, 3 by default; twice as many outputs with
    learn_sigma, else as many): the UNet, or with arch="dit" a DiT.

    :param image_size: the side of square images, or (height, width) for rectangles: the
        channel table and attention_resolutions then go by the shorter side (an addition).
    :param channel_mult: "" to pick by image size (512, 256, 128, 64, 32), or e.g. "1,2,2,2".
    :param attention_resolutions: feature-map sizes with attention, e.g. "16,8".
    :param num_classes: number of classes when class_cond (extra to the reference).
    :param class_dropout_prob: > 0 for classifier-free guidance training: the label embedding
        gets one more row, the null class (index num_classes), and the model's num_classes
        counts it. 0 (the default) keeps the reference's layout (extra to the reference).
    :param in_channels: image channels: 1 for grey data, 3 (the reference's only value) for
        RGB, any count for .npy data (extra to the reference).
    :param arch: "unet" (the reference's network) or "dit" (Peebles & Xie 2023): the one
        switch between network families (extra to the reference). A DiT takes image_size,
        in_channels, learn_sigma, class_cond, num_classes, class_dropout_prob, use_checkpoint
        and use_fp16; the UNet's shape flags do not apply to it.
    :param dit_model: the DiT's size with arch="dit": "DiT-S/2" ... "DiT-XL/8", or
        "depth=D,width=W,heads=H,patch=P" (extra to the reference).
    :return: a UNetModel, or a DiT.
    """
    return _NETWORK_BUILDERS[checked_arch(arch)](locals())


def checked_arch(arch):
    """:raises ValueError: unless arch names a network family create_model builds."""
    if arch not in _NETWORK_BUILDERS:
        raise ValueError(f"unknown --arch {arch!r}: use {' or '.join(_NETWORK_BUILDERS)}")
    return arch


def _diffusion_dit(flags):
    """create_model's DiT: the flags that apply to it checked, the named size built."""
    _check_num_classes(flags["num_classes"])
    _check_in_channels(flags["in_channels"])
    check_class_dropout_prob(flags["class_dropout_prob"], flags["class_cond"])
    if flags["dropout"]:
        raise ValueError(f"--dropout {flags['dropout']}: a DiT has no dropout layers (the "
                         "paper trains without): pass --dropout 0 with --arch dit")
    return _dit_model(
        flags["dit_model"],
        image_size=flags["image_size"],
        in_channels=flags["in_channels"],
        num_classes=flags["num_classes"] if flags["class_cond"] else None,
        class_dropout_prob=flags["class_dropout_prob"],
        learn_sigma=flags["learn_sigma"],
        use_checkpoint=flags["use_checkpoint"],
        use_fp16=flags["use_fp16"],
    )


# --arch -> the builder of create_model's network from its flags (a new network family adds a
# row here; guided_diffusion/networks.py says what the network must provide).
_NETWORK_BUILDERS = {
    "unet": lambda flags: _diffusion_unet(
        UNetModel, flags, size=flags["image_size"], size_flag="--image_size",
        table=_CHANNEL_MULT_BY_SIZE,
    ),
    "dit": _diffusion_dit,
}


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
    classifier_channel_mult="",
    in_channels=3,
):
    """
    Build a noisy-image classifier and the diffusion it is trained on, from the flags of
    classifier_and_diffusion_defaults().

    :param num_classes: number of output classes (extra to the reference).
    :param classifier_channel_mult: see create_classifier (extra to the reference).
    :param in_channels: see create_classifier (extra to the reference).
    :return: (EncoderUNetModel, SpacedDiffusion).
    """
    return _network_and_diffusion(create_classifier, locals())


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
    classifier_channel_mult="",
    in_channels=3,
):
    """
    Build the noisy-image classifier: the UNet's encoder half with 64-channel attention heads.

    :param image_size: a side, or (height, width) (see create_model).
    :param num_classes: number of output logits (extra to the reference, which fixes 1000).
    :param classifier_channel_mult: "" to pick by image size as create_model does, or an explicit
        comma-separated list for other sizes (extra to the reference).
    :param in_channels: image channels (extra to the reference, which fixes 3).
    :return: an EncoderUNetModel.
    """
    _check_num_classes(num_classes)
    _check_in_channels(in_channels)
    channel_mult = _parse_channel_mult(
        classifier_channel_mult, image_size, _CHANNEL_MULT_BY_SIZE, "image size"
    )
    check_size_fits_levels(image_size, channel_mult, mult_flag="--classifier_channel_mult")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.0,
    channel_mult="",
    in_channels=3,
    arch="unet",
):
    """
    Build a super-resolution UNet and its diffusion from sr_model_and_diffusion_defaults() flags
    (arch: "unet", the only super-resolution network; extra to the reference).

    :param num_classes: number of classes when class_cond (extra to the reference).
    :param class_dropout_prob: see create_model (extra to the reference).
    :param channel_mult: see sr_create_model ("" = by large_size, as the reference; extra to the
        reference, for sizes outside its table).
    :param in_channels: see sr_create_model (extra to the reference).
    :return: (SuperResModel, SpacedDiffusion).
    """
    return _network_and_diffusion(sr_create_model, locals())


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
    channel_mult="",
    class_dropout_prob=0.0,
    in_channels=3,
    arch="unet",
):
    """
    Build the super-resolution UNet working at large_size (small_size only describes the data).

    :param num_classes: number of classes when class_cond (extra to the reference).
    :param channel_mult: "" for the built-in table, or an explicit list (extra to the reference).
    :param class_dropout_prob: see create_model (extra to the reference).
    :param in_channels: channels of the images (and of the low-resolution input); the network
        sees twice as many (extra to the reference, which fixes 3).
    :return: a SuperResModel.
    """
    del small_size  # the low-resolution input is upsampled to large_size before the network
    if checked_arch(arch) != "unet":
        raise ValueError(f"--arch {arch}: the super-resolution model is a UNet; pass --arch unet")
    return _diffusion_unet(
        SuperResModel, locals(), size=large_size, size_flag="--large_size",
        table=_SR_CHANNEL_MULT_WITH_FALLBACK,
    )


# The factories' flags that the UNet constructors take under the same name, unchanged.
_UNET_FLAGS_AS_IS = (
    "num_res_blocks",
    "dropout",
    "use_checkpoint",
    "use_fp16",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
)


def _diffusion_unet(model_class, flags, *, size, size_flag, table):
    """
    Check the flags of create_model or sr_create_model and build their UNet: the two differ
    only in the class, the size the network works at and the channel table.

    :param model_class: UNetModel or SuperResModel.
    :param flags: the factory's arguments by name; a flag it lacks (the super-resolution
        factory has no use_new_attention_order) keeps the constructor's default.
    :param size: the side (or (height, width)) the network works at.
    :param size_flag: that size's flag, e.g. "--large_size", for error messages.
    :param table: channel multipliers by size, for an empty channel_mult.
    """
    in_channels = flags["in_channels"]
    num_classes = flags["num_classes"]
    class_dropout_prob = flags["class_dropout_prob"]
    _check_num_classes(num_classes)
    _check_in_channels(in_channels)
    check_class_dropout_prob(class_dropout_prob, flags["class_cond"])
    size_name = size_flag.lstrip("-").replace("_", " ")
    channel_mult = _parse_channel_mult(flags["channel_mult"], size, table, size_name)
    check_size_fits_levels(size, channel_mult, size_flag=size_flag)
    return model_class(
        image_size=size,
        in_channels=in_channels,
        model_channels=flags["num_channels"],
        out_channels=2 * in_channels if flags["learn_sigma"] else in_channels,
        attention_resolutions=_attention_ds(flags["attention_resolutions"], size),
        channel_mult=channel_mult,
        num_classes=label_rows(num_classes, class_dropout_prob) if flags["class_cond"] else None,
        **{name: flags[name] for name in _UNET_FLAGS_AS_IS if name in flags},
    )


def _network_and_diffusion(build, flags):
    """
    The pair a *_and_diffusion factory returns: `build` called with the factory's arguments it
    takes (by name), and the diffusion of the factory's diffusion flags.

    :param build: create_model, create_classifier or sr_create_model.
    :param flags: the factory's arguments by name (its locals() on entry).
    :return: (network, SpacedDiffusion).
    """
    accepted = inspect.signature(build).parameters
    network = build(**{name: value for name, value in flags.items() if name in accepted})
    return network, diffusion_from_flags(flags, flags["timestep_respacing"])


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """
    Build the diffusion process for the given flags. The objective is the hybrid loss of Nichol &
    Dhariwal 2021 (section 3.1) when learn_sigma with rescale_learned_sigmas, the full variational
    bound with use_kl, else the simple MSE of Ho et al. 2020 (eq. 14).

    :param steps: number of diffusion steps T of the training process.
    :param learn_sigma: the model also outputs variance interpolation values (LEARNED_RANGE).
    :param sigma_small: with fixed variances, use the posterior variance instead of beta_t.
    :param noise_schedule: "linear" or "cosine".
    :param use_kl: train on the variational bound (RESCALED_KL).
    :param predict_xstart: the model predicts x_0 instead of the noise.
    :param rescale_timesteps: feed the model timesteps scaled to [0, 1000).
    :param rescale_learned_sigmas: use RESCALED_MSE (vb term scaled by T/1000).
    :param timestep_respacing: "" for all steps, else e.g. "250" or "ddim50" or "10,20,30".
    :return: a SpacedDiffusion (over all steps when timestep_respacing is empty).
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE

    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE

    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def script_parser(description, *families):
    """
    A script's ArgumentParser: one --flag per entry of the defaults dictionaries (a later
    dictionary's entry wins over an earlier one's), described and grouped as
    add_dict_to_argparser does.

    :param description: the script's one-line --help description.
    :param families: dictionaries of {flag name: default}, e.g. model_and_diffusion_defaults().
    """
    defaults = {}
    for family in families:
        defaults.update(family)
    parser = argparse.ArgumentParser(description=description)
    add_dict_to_argparser(parser, defaults)
    return parser


def add_dict_to_argparser(parser, default_dict):
    """
    Add one --flag per entry of a defaults dictionary; booleans parse with str2bool and a None
    default takes strings. Each flag's --help line is its description in cli.help_table.FLAG_HELP
    plus its default, under its group's heading (flags missing from the table show the default
    alone, in argparse's general group).

    :param parser: an argparse.ArgumentParser.
    :param default_dict: {flag name: default value}.
    """
    for name, default in default_dict.items():
        if default is None:
            kind = str
        elif isinstance(default, bool):
            kind = str2bool
        elif name == "image_size" and isinstance(default, int):
            # An int for a square as in the reference, or "H,W" for a rectangle (an addition).
            kind = _image_size_arg
        else:
            kind = type(default)
        # The description, the default in --help and the group come from cli/help_table.FLAG_HELP,
        # so that every script explains its flags without a line of its own.
        add_flag(parser, name, default=default, type=kind)


def _image_size_arg(text):
    # argparse shows an ArgumentTypeError's message as it is ("invalid value" otherwise).
    try:
        return parse_image_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def args_to_dict(args, keys):
    """
    :param args: an argparse.Namespace.
    :param keys: the attribute names to copy.
    :return: {key: value of args.key}.
    """
    return {key: getattr(args, key) for key in keys}


def str2bool(v):
    """
    Parse a command-line boolean: yes/true/t/y/1 or no/false/f/n/0, any case.

    :param v: a string (or a bool, returned as is).
    :return: the bool.
    """
    if isinstance(v, bool):
        return v
    text = v.strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), got {v!r}")


def diffusion_from_flags(flags, timestep_respacing):
    """
    create_gaussian_diffusion for the diffusion flags of a model, with another respacing.

    :param flags: a dict with the keys of diffusion_defaults() (other keys are ignored).
    :param timestep_respacing: "" (all steps), "ddimN", "N", ...
    :return: a SpacedDiffusion.
    """
    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        noise_schedule=flags["noise_schedule"],
        use_kl=flags["use_kl"],
        predict_xstart=flags["predict_xstart"],
        rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"],
        timestep_respacing=timestep_respacing,
    )


def diffusion_for_steps(flags, steps):
    """
    The DDIM diffusion with `steps` steps, strided as in the DDIM paper ("ddim<steps>" respacing),
    for a model trained with the diffusion flags in `flags`.

    :param flags: a dict with the keys of diffusion_defaults() (other keys are ignored).
    :param steps: the number of sampling steps, at most flags["diffusion_steps"].
    :return: a SpacedDiffusion.
    :raises ValueError: when no integer stride gives exactly that many steps.
    """
    return diffusion_from_flags(flags, f"ddim{steps}")
