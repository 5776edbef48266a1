"""
Explain a checkpoint that does not fit the network built from the command-line flags, in terms of
the flags to change ("checkpoint has label_emb.weight: pass --class_cond True") rather than
torch's list of missing and unexpected keys.

Two sources of hints: tensors whose shape gives a flag away (the label embedding and the
classifier's head: --num_classes; the base width, the output channels, the doubled AdaGN
projection), and, when the flags and a builder are given, a search of the flag space for the
combination that makes every key and shape fit: changes are added one flag at a time, keeping the
few combinations whose state dict is closest to the checkpoint's, each candidate built on the
meta device (no memory, no initialisation). The message then names every flag to change at once.
"""

import itertools
import time

import torch

from ..networks import ARCHITECTURES, architecture_of, label_key_of
from ..unet import EncoderUNetModel

_BOOL_FLAGS = (
    "class_cond",
    "learn_sigma",
    "use_scale_shift_norm",
    "resblock_updown",
    "classifier_use_scale_shift_norm",
    "classifier_resblock_updown",
)
_DEPTH_FLAGS = ("num_res_blocks", "classifier_depth")
_WIDTH_FLAGS = ("num_channels", "classifier_width")
_ATTENTION_FLAGS = ("attention_resolutions", "classifier_attention_resolutions")
_SIZE_FLAGS = ("image_size", "large_size")
_CHANNEL_MULT_FLAGS = ("channel_mult", "classifier_channel_mult")
_BUILTIN_SIZES = (32, 64, 128, 256, 512)
# The --class_dropout_prob suggested for a checkpoint with a null-class row: any value > 0 gives
# the same layout; 0.1 is the usual training value.
_NULL_CLASS_PROB = 0.1
_BUILTIN_MULTS = ("1,2,2,2", "1,2,3,4", "1,1,2,3,4", "1,1,2,2,4,4", "0.5,1,1,2,2,4,4")
_POOLS = ("attention", "adaptive", "spatial", "spatial_v2")
# The search adds up to this many flag changes, keeps the closest few combinations at each
# step, and gives up after this many seconds: an error message should not keep anyone waiting
# (a fit is usually found in a few seconds; a hopeless search of a large network is cut short).
_MAX_CHANGES = 4
_BEAM = 3
_SEARCH_SECONDS = 15.0
_FALLBACK = (
    "check --num_res_blocks, --channel_mult/--image_size, --attention_resolutions, "
    "--resblock_updown, --use_scale_shift_norm and --num_heads/--num_head_channels against the "
    "flags the checkpoint was trained with"
)
_CLASSIFIER_FALLBACK = (
    "check --classifier_depth, --classifier_channel_mult/--image_size, "
    "--classifier_attention_resolutions, --classifier_resblock_updown, "
    "--classifier_use_scale_shift_norm and --classifier_pool against the flags the classifier was "
    "trained with"
)
_DIT_FALLBACK = (
    "check --dit_model, --image_size, --in_channels, --learn_sigma, --class_cond, "
    "--num_classes and --class_dropout_prob against the flags the checkpoint was trained with"
)
# What other files of a run hold, by the "format" (or "kind") entry they carry.
_OTHER_FILES = {
    "guided_diffusion.train_state/1": (
        "this is a training-state file (stateNNNNNN.pt: random-number streams and data "
        "positions, no weights): pass the modelNNNNNN.pt or ema_<rate>_NNNNNN.pt file beside it"
    ),
    "guided_diffusion.cgan/1": (
        "this is a cGAN checkpoint (cganNNNNNN.pt): sample it with scripts/cgan_sample.py"
    ),
    "vae": "this is a VAE checkpoint (vaeNNNNNN.pt): sample it with scripts/vae_sample.py",
}


def is_optimizer_state(obj):
    return isinstance(obj, dict) and "param_groups" in obj and "state" in obj


def explain_state_dict_mismatch(model, state_dict, flags=None, build=None):
    """
    Say why a checkpoint does not fit a network, naming the flags to change.

    :param model: the network built from the flags.
    :param state_dict: the loaded checkpoint.
    :param flags: optional dict of the flags the network was built from; with `build`, enables
        the search for one-flag changes that make the checkpoint fit.
    :param build: optional function flags -> network.
    :return: "" when keys and shapes match, else one line.
    """
    if is_optimizer_state(state_dict):
        return (
            "this is an optimizer checkpoint (optNNNNNN.pt): pass a modelNNNNNN.pt or "
            "ema_<rate>_NNNNNN.pt file instead"
        )
    if isinstance(state_dict, dict):
        kind = state_dict.get("format", state_dict.get("kind"))
        if isinstance(kind, str) and kind in _OTHER_FILES:
            return _OTHER_FILES[kind]
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        return "the checkpoint is not a state dict of a network"

    expected = _shapes(model.state_dict())
    given = _shapes(state_dict)
    if expected == given and set(expected) == set(state_dict):
        return ""
    is_classifier = isinstance(model, EncoderUNetModel)
    swapped = _swapped_network(given, is_classifier)
    if swapped:
        return swapped
    arch = getattr(model, "arch", "")
    if not is_classifier:
        other = _other_architecture(arch, given, flags)
        if other:
            return other
    hints = _hints(expected, given, flags, build, is_classifier, model)

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [k for k in expected if k in given and given[k] != expected[k]]
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        detail.append(f"{len(reshaped)} shape mismatches, e.g. {k} {given[k]} vs {expected[k]}")
    return f"{hints} ({'; '.join(detail)})"


def _swapped_network(given, is_classifier):
    """
    A classifier's weights where a diffusion model's are expected, or the reverse: the UNet has
    a way up (output_blocks), the classifier (the UNet's encoder half) does not.
    """
    has_way_up = any(k.startswith("output_blocks.") for k in given)
    has_way_down = any(k.startswith("input_blocks.") for k in given)
    if is_classifier and has_way_up:
        return (
            "this file holds a diffusion model (a UNet), not a noisy-image classifier: give it "
            "as --model_path, and a classifier trained by classifier_train.py as --classifier_path"
        )
    if not is_classifier and has_way_down and not has_way_up:
        return (
            "this file holds a noisy-image classifier (trained by classifier_train.py), not a "
            "diffusion model: give it as --classifier_path (classifier_sample.py), and a "
            "diffusion model's model or EMA file as --model_path"
        )
    return ""


def _other_architecture(arch, given, flags):
    """
    A checkpoint of another network family (guided_diffusion/networks.py: each family's
    signature keys) than the --arch built: name it, with the flags its shapes give away.
    """
    theirs = architecture_of(given)
    if not arch or theirs is None or theirs == arch:
        return ""
    layout = ARCHITECTURES[theirs].layout_flags(given)
    flags = flags or {}
    changes = {k: v for k, v in layout.items() if k == "arch" or flags.get(k) != v}
    return (f"this file holds a {_FAMILY_NAMES.get(theirs, theirs)}, not a "
            f"{_FAMILY_NAMES.get(arch, arch)}: pass {_format(changes)}")


# How messages name the network families.
_FAMILY_NAMES = {"unet": "UNet (--arch unet)", "dit": "DiT (--arch dit)"}


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}


def _flag_name(flags, choices, is_classifier):
    if flags:
        found = next((f for f in choices if f in flags), None)
        if found is not None:
            return found
    return choices[1] if is_classifier else choices[0]


def _direct_changes(expected, given, flags, is_classifier, model=None):
    """Flag values read straight off telltale tensors of the checkpoint."""
    flags = flags or {}
    changes = {}
    label = label_key_of(model)
    if label in given and label not in expected:
        changes["class_cond"] = True
    elif label in expected and label not in given:
        changes["class_cond"] = False
    if label in given:
        changes.update(_label_row_changes(given[label][0], expected, flags, label))
    if getattr(model, "arch", "unet") != "unet":
        # A family whose shapes tell its whole layout (a DiT): the flags where the checkpoint's
        # layout and the built network's differ.
        theirs = type(model).layout_flags(given, like=model)
        ours = type(model).layout_flags(expected, like=model)
        changes.update({k: v for k, v in theirs.items() if ours.get(k) != v and k not in changes})
        return changes
    if "time_embed.0.weight" in given and "time_embed.0.weight" in expected:
        width = given["time_embed.0.weight"][1]
        if width != expected["time_embed.0.weight"][1]:
            changes[_flag_name(flags, _WIDTH_FLAGS, is_classifier)] = width
    channels = flags.get("in_channels", 3)
    first = "input_blocks.0.0.weight"
    if first in given and first in expected and given[first][1] != expected[first][1]:
        # The first convolution reads the image channels (twice as many for the super-resolution
        # model, whose input is the noisy image and the upsampled low-resolution one).
        per_channel = max(1, expected[first][1] // channels)
        if given[first][1] % per_channel == 0:
            channels = given[first][1] // per_channel
            changes["in_channels"] = channels
    out = "out.2.weight"
    if not is_classifier and out in given and out in expected and given[out] != expected[out]:
        if given[out][0] in (channels, 2 * channels) and given[out][1:] == expected[out][1:]:
            learned = given[out][0] == 2 * channels
            if flags.get("learn_sigma") != learned:
                changes["learn_sigma"] = learned
    if is_classifier:
        # Whatever the pooling head, a classifier's last bias has one entry per class.
        rows, wanted = _head_rows(given), _head_rows(expected)
        if rows is not None and wanted is not None and rows != wanted:
            changes["num_classes"] = rows
    reshaped = [k for k in expected if k in given and given[k] != expected[k]]
    film = [k for k in reshaped if ".emb_layers.1." in k]
    if film and film == reshaped and set(given) == set(expected):
        # Only the AdaGN projections differ: they map the embedding to a scale and a shift
        # (twice the channels) with use_scale_shift_norm, to a shift alone without.
        flag = _flag_name(flags, ("use_scale_shift_norm", "classifier_use_scale_shift_norm"), is_classifier)
        changes[flag] = given[film[0]][0] > expected[film[0]][0]
    return changes


def _head_rows(shapes):
    """The number of outputs of a classifier's head: its last bias (None when it has none)."""
    biases = [k for k in shapes if k.startswith("out.") and k.endswith(".bias")]
    if not biases or len(shapes[biases[-1]]) != 1:
        return None
    return shapes[biases[-1]][0]


def _label_row_changes(rows, expected, flags, label="label_emb.weight"):
    """
    The flags that give the label embedding `rows` rows: --num_classes, or --class_dropout_prob
    for a checkpoint trained for classifier-free guidance (its extra row is the null class).
    """
    if "num_classes" not in flags:
        current = expected.get(label, (rows,))[0]
        return {} if rows == current else {"num_classes": rows}
    classes = flags["num_classes"]
    if "class_dropout_prob" not in flags:
        return {} if rows == classes else {"num_classes": rows}
    null_row = flags["class_dropout_prob"] > 0
    if rows == classes + null_row:
        return {}
    if rows == classes + 1 and not null_row:
        return {"class_dropout_prob": _NULL_CLASS_PROB}
    if rows == classes and null_row:
        return {"class_dropout_prob": 0.0}
    return {"num_classes": rows - null_row}


def _hints(expected, given, flags, build, is_classifier, model=None):
    direct = _direct_changes(expected, given, flags, is_classifier, model)
    label = label_key_of(model)
    prefix = ""
    if "class_cond" in direct:
        prefix = f"checkpoint {'has' if direct['class_cond'] else 'has no'} {label}: "
    elif direct.get("class_dropout_prob", 0) > 0:
        rows = given[label][0]
        prefix = (
            f"checkpoint has {rows} label rows, one more than --num_classes {rows - 1}: it was "
            "trained for classifier-free guidance (the extra row is the null class; any "
            "--class_dropout_prob > 0 builds it): "
        )
    elif direct.get("class_dropout_prob", None) == 0:
        prefix = "checkpoint has no null-class label row (trained without --class_dropout_prob): "
    fallback = _CLASSIFIER_FALLBACK if is_classifier else _FALLBACK
    searchable = getattr(model, "arch", "unet") == "unet"
    if not searchable:
        # The search varies UNet flags; a DiT's layout is all in `direct`.
        fallback = _DIT_FALLBACK
        checkable = direct and flags is not None and build is not None
        if checkable and not _fits(build, {**flags, **direct}, given):
            return f"{prefix}pass {_format(direct)} (other flags may differ too: {fallback})"
        return f"{prefix}pass {_format(direct)}" if direct else fallback
    if flags is not None and build is not None:
        base = {**flags, **direct}
        if direct and _fits(build, base, given):
            return f"{prefix}pass {_format(direct)}{_null_class_note(direct, flags)}"
        fitting = _search(build, base, given)
        if fitting:
            # Several combinations can fit: another image size moves the attention levels just
            # as other attention_resolutions do, and the weights cannot tell which size the
            # model was trained at. Each alternative then says the size it means, so that the
            # wrong one is not followed blindly (it would sample at the wrong size).
            size_flag = next((f for f in _SIZE_FLAGS if f in flags), None)
            sizes = {changes.get(size_flag, flags.get(size_flag)) for changes in fitting}
            fitting = sorted(fitting, key=lambda changes: size_flag not in changes)

            def alternative(changes):
                text = _format({**direct, **changes})
                if len(sizes) > 1:
                    size = changes.get(size_flag, flags[size_flag])
                    text += f" (for a model trained at {size}x{size})"
                return text

            return prefix + "pass " + " or pass ".join(alternative(c) for c in fitting)
    if direct:
        return f"{prefix}pass {_format(direct)} (other flags may differ too: {fallback})"
    return fallback


def _search(build, base, given, max_changes=_MAX_CHANGES, beam=_BEAM, seconds=None):
    """
    The flag changes that make a network built from `base` match the checkpoint's shapes.

    A beam search over combinations of the one-flag changes of _single_changes: at each depth
    every kept combination is extended by one more flag, and the combinations whose state dict
    is closest to the checkpoint's (fewest missing, unexpected and reshaped keys) go on. It runs
    greedily (one combination kept) first, which is enough when each flag's effect shows alone,
    then with `beam` kept. Flags a found combination does not need are dropped again.

    :return: up to 3 fitting change dicts with the fewest changes, likeliest first; [] when
        none is found within max_changes flags or `seconds` (default _SEARCH_SECONDS).
    """
    deadline = time.monotonic() + (_SEARCH_SECONDS if seconds is None else seconds)
    distances = {}  # the builds already made, by their flags

    def distance(changes):
        key = frozenset(changes.items())
        if key not in distances:
            distances[key] = _distance(build, {**base, **changes}, given)
        return distances[key]

    for width in dict.fromkeys((1, beam)):
        frontier, seen = [{}], set()
        for _ in range(max_changes):
            scored, fitting = [], []
            for changes in frontier:
                for change in _single_changes({**base, **changes}):
                    if set(change) & set(changes):
                        continue  # each flag changes once
                    candidate = {**changes, **change}
                    key = frozenset(candidate.items())
                    if key in seen:
                        continue
                    seen.add(key)
                    found = distance(candidate)
                    if found == 0:
                        fitting.append(_needed(distance, candidate))
                        if len(fitting) == 3:
                            return fitting
                    elif found is not None:
                        scored.append((found, len(scored), candidate))
                    if time.monotonic() > deadline:
                        return fitting
            if fitting:
                return fitting
            frontier = [candidate for _, _, candidate in sorted(scored)[:width]]
            if not frontier:
                break
    return []


def _needed(distance, changes):
    """changes without the flags the fit does not need (the search may pick up a neutral one)."""
    for name in list(changes):
        fewer = {k: v for k, v in changes.items() if k != name}
        if fewer and distance(fewer) == 0:
            changes = fewer
    return changes


def _null_class_note(direct, flags):
    # A label count read off the checkpoint may include a null-class row: say so when the
    # script could build one instead.
    if "num_classes" not in direct or flags.get("class_dropout_prob", None) != 0:
        return ""
    # The alternative must be complete on its own: a model without --class_cond needs it too.
    class_cond = "--class_cond True " if direct.get("class_cond") else ""
    return (
        f" (or {class_cond}--num_classes {direct['num_classes'] - 1} --class_dropout_prob "
        f"{_NULL_CLASS_PROB} if it was trained for classifier-free guidance: its "
        f"{direct['num_classes']} label rows are then {direct['num_classes'] - 1} classes and the "
        "null class)"
    )


def _single_changes(flags):
    """Candidate one-flag changes for the search, most likely first."""
    for name in _BOOL_FLAGS:
        if name in flags:
            yield {name: not flags[name]}
    for name in _DEPTH_FLAGS:
        if name in flags:
            for depth in range(1, 5):
                if depth != flags[name]:
                    yield {name: depth}
    attention_flag = next((f for f in _ATTENTION_FLAGS if f in flags), None)
    size_flag = next((f for f in _SIZE_FLAGS if f in flags), None)
    if attention_flag is not None and size_flag is not None:
        # A rectangle's attention levels go by its shorter side.
        size = flags[size_flag]
        size = size if isinstance(size, int) else min(size)
        # Only resolutions the network has: an entry for a level it lacks changes nothing.
        levels = [size // 2**k for k in range(_level_count(flags, size)) if size // 2**k >= 1]
        # Contiguous runs of resolutions ("32,16,8") cover the configurations in use.
        for start, stop in itertools.combinations(range(len(levels) + 1), 2):
            text = ",".join(str(r) for r in levels[start:stop])
            if text != flags[attention_flag]:
                yield {attention_flag: text}
    if size_flag is not None and isinstance(flags[size_flag], int):
        current = flags[size_flag]
        sizes = set(_BUILTIN_SIZES) | {current // 4, current // 2, current * 2}
        for size in sorted(s for s in sizes if s >= 8 and s != current):
            yield {size_flag: size}
    mult_flag = next((f for f in _CHANNEL_MULT_FLAGS if f in flags), None)
    if mult_flag is not None:
        for mult in _BUILTIN_MULTS:
            if mult != flags[mult_flag]:
                yield {mult_flag: mult}
    if "classifier_pool" in flags:
        for pool in _POOLS:
            if pool != flags["classifier_pool"]:
                yield {"classifier_pool": pool}


def _level_count(flags, size):
    """How many resolution levels the network of `flags` has (7, the most, when unknown)."""
    mult_flag = next((f for f in _CHANNEL_MULT_FLAGS if f in flags), None)
    mult = str(flags.get(mult_flag, "")).strip() if mult_flag else ""
    if mult:
        return len([m for m in mult.split(",") if m.strip()])
    return {512: 7, 256: 6, 128: 5, 64: 4, 32: 4}.get(size, 7)


def _fits(build, flags, given):
    return _distance(build, flags, given) == 0


def _distance(build, flags, given):
    """
    How far the network `flags` build is from the checkpoint: its missing, unexpected and
    reshaped keys (0 = it fits); None for an impossible combination of flags.
    """
    try:
        with torch.device("meta"):
            candidate = build(dict(flags))
    except Exception:  # an impossible combination of flags is simply not a candidate
        return None
    shapes = _shapes(candidate.state_dict())
    missing = sum(1 for k in shapes if k not in given)
    unexpected = sum(1 for k in given if k not in shapes)
    reshaped = sum(1 for k in shapes if k in given and given[k] != shapes[k])
    return missing + unexpected + reshaped


def _format(changes):
    return " ".join(f"--{k} {v}" for k, v in changes.items())
