"""
Sampling from a run without repeating its flags: the sampling scripts and tools take the model's
flags from the args.json a training run wrote into its log folder (runtime/run_record).

    python scripts/image_sample.py --model_path runs/m/ema_0.9999_010000.pt --num_samples 64

- `--config PATH/args.json` names the record; without it, the args.json beside --model_path is
  used when there is one (`--config none`: never). classifier_sample.py also reads the one
  beside --classifier_path for the classifier's flags.
- Only the flags that describe the checkpoint are taken: the model and diffusion groups of the
  flag table (cli/help_table.FLAG_HELP), without --timestep_respacing (how to sample is the sampling
  run's choice); for a classifier, the classifier group with --image_size and --num_classes.
- A flag given on the command line wins. If it contradicts the checkpoint, loading the weights
  fails with the usual one-line message naming the flag to change.
- A released checkpoint (no args.json beside it) is read exactly as before.
- One line says which flags came from where; it is logged once the log folder exists.
"""

import argparse
import json
import os

from .. import logger
from ..errors import ScriptError
from ..runtime.run_record import FAMILY_WORDS, RECORD_FILE, read_run_record
from .flags import explicit_flags, flag_help

__all__ = ["parse_args", "record_beside", "training_record", "NO_CONFIG"]

# --config none: do not read any args.json.
NO_CONFIG = "none"
# Flags of the model and diffusion groups that do not describe the checkpoint.
_SAMPLING_CHOICES = ("timestep_respacing",)
# Classifier-group flags that are choices of the sampling run, not of the checkpoint.
_CLASSIFIER_CHOICES = ("classifier_path", "classifier_scale", "classifier_use_fp16")


def record_beside(checkpoint):
    """The args.json in the folder of a checkpoint, or None."""
    if not checkpoint:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), RECORD_FILE)
    return path if os.path.isfile(path) else None


def training_record(args):
    """
    The training record that describes --model_path: --config's, else the args.json beside the
    checkpoint; None with --config none or when there is none.
    """
    config = getattr(args, "config", "")
    if config == NO_CONFIG:
        return None
    if config:
        return read_run_record(config)
    beside = record_beside(getattr(args, "model_path", ""))
    return read_run_record(beside) if beside else None


def _model_keys(args):
    keys = []
    for name in vars(args):
        row = flag_help(name)
        if row and row[0] in ("model", "diffusion") and name not in _SAMPLING_CHOICES:
            keys.append(name)
    return keys


def _classifier_keys(args):
    keys = [name for name in vars(args)
            if (flag_help(name) or ("",))[0] == "classifier" and name not in _CLASSIFIER_CHOICES]
    return keys + [k for k in ("image_size", "num_classes") if hasattr(args, k)]


def _check_family(record, expected, role):
    family = record.get("family")
    if family != expected:
        what = FAMILY_WORDS.get(family, f"a {record.get('script', 'unknown')} run")
        raise ScriptError(
            f"{record['path']} records {what}, but {role} takes {FAMILY_WORDS[expected]}: pass "
            f"that model's checkpoint, its run's --config, or --config {NO_CONFIG} to ignore "
            "the args.json"
        )


# Flags whose parsed value is a tuple (kept in args.json as a list): --image_size H,W.
_LIST_FLAGS = ("image_size", "large_size", "small_size")
_KIND_WORDS = {int: "a whole number", float: "a number"}


def _actions(parser):
    """The parser's flags by destination."""
    return {action.dest: action for action in parser._actions}


def _convert(action, key, value, path):
    """
    A value read from an args.json, through the same conversion and checks as the command line
    gives its flag (the parser's type and choices), so that "False" is false and "abc" for a
    number is refused in one line naming the key and the file.

    :raises ScriptError: naming the key, the file and the fixes.
    """
    def refuse(why):
        return ScriptError(
            f"{path}: {json.dumps(key)}: {json.dumps(value)} is not a value --{key} takes "
            f"({why}): fix it in that file, pass --{key} on the command line, or pass --config "
            f"{NO_CONFIG} to ignore the file"
        )

    if action is None:
        return value
    kind = action.type
    if value is None:
        if action.default is None:
            return None
        raise refuse("null")
    if isinstance(value, dict):
        raise refuse("an object")
    if isinstance(value, list):
        # Tuples are kept as lists (a rectangular --image_size H,W): the command line's text.
        if key not in _LIST_FLAGS or any(isinstance(v, (list, dict, bool)) or v is None
                                         for v in value):
            raise refuse("a list")
        value_text = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        if kind is not None and getattr(kind, "__name__", "") != "str2bool":
            raise refuse("true/false")
        value_text = "true" if value else "false"
    else:
        value_text = str(value)
    if kind is not None and getattr(kind, "__name__", "") == "str2bool" \
            and not isinstance(value, (bool, str)):
        raise refuse("expected true or false")
    try:
        converted = kind(value_text) if kind is not None else value_text
    except argparse.ArgumentTypeError as exc:
        raise refuse(str(exc)) from None
    except (TypeError, ValueError):
        raise refuse(f"expected {_KIND_WORDS.get(kind, 'a ' + getattr(kind, '__name__', 'value'))}") \
            from None
    if action.choices is not None and converted not in action.choices:
        raise refuse("one of " + ", ".join(map(str, action.choices)))
    return converted


def _take(record, keys, args, given, taken, origin, actions=None):
    """Set each of keys the record has (and the command line lacks) on args; remember where from."""
    flags = record["flags"]
    actions = actions or {}
    class_cond = flags.get("class_cond", False)
    if "class_cond" in actions:
        class_cond = _convert(actions["class_cond"], "class_cond", class_cond, record["path"])
    if origin == "model" and not class_cond:
        # An unconditional model's --num_classes is its default, not a fact about the model.
        keys = [k for k in keys if k != "num_classes"]
    for key in keys:
        if key not in flags or key in given:
            continue
        value = _convert(actions.get(key), key, flags[key], record["path"])
        if key in taken and taken[key][0] != value:
            raise ScriptError(
                f"{taken[key][1]} has --{key} {taken[key][0]} but {record['path']} has "
                f"--{key} {value}: the model and the classifier must agree (pass --{key} to "
                "choose)"
            )
        setattr(args, key, value)
        taken[key] = (value, record["path"])


def parse_args(parser, argv=None):
    """
    Parse a sampling script's flags, filling the model's (and classifier's) flags from training
    records as the module docstring says.

    :param parser: the script's parser (with --config and --model_path).
    :param argv: the arguments (None: sys.argv[1:]).
    :return: the argparse namespace.
    :raises FileNotFoundError: when --config does not exist.
    :raises ScriptError: when a record is of another model family or unreadable.
    """
    args = parser.parse_args(argv)
    logger.hold_lines([])
    config = getattr(args, "config", "")
    if config == NO_CONFIG:
        return args
    given = explicit_flags(parser, argv)
    expected = "super_res" if hasattr(args, "large_size") else "diffusion"
    sources = []
    if config:
        sources.append((read_run_record(config), "--config", "model"))
    else:
        beside = record_beside(getattr(args, "model_path", ""))
        if beside:
            sources.append((read_run_record(beside), "--model_path", "model"))
    classifier_record = record_beside(getattr(args, "classifier_path", ""))
    if classifier_record:
        sources.append((read_run_record(classifier_record), "--classifier_path", "classifier"))

    taken = {}
    for record, role, origin in sources:
        family = "classifier" if origin == "classifier" else expected
        _check_family(record, family, role)
        keys = _classifier_keys(args) if origin == "classifier" else _model_keys(args)
        _take(record, keys, args, given, taken, origin, _actions(parser))
    if sources:
        logger.hold_lines([_report(sources, taken, given, args)])
    return args


def _report(sources, taken, given, args):
    parts = []
    for record, _, _ in sources:
        mine = [f"--{k} {v}" for k, (v, path) in taken.items() if path == record["path"]]
        overridden = [
            f"--{k} {getattr(args, k)} (it says {record['flags'][k]})"
            for k in sorted(given) if k in record["flags"] and record["flags"][k] != getattr(args, k)
            and (k in _model_keys(args) or k in _classifier_keys(args))
        ]
        text = f"from {record['path']}: {' '.join(mine) or 'nothing'}"
        if overridden:
            text += f"; overridden on the command line: {', '.join(overridden)}"
        parts.append(text)
    others = sorted(k for k in given if k not in taken)
    parts.append("from the command line: " + (" ".join(f"--{k}" for k in others) or "nothing"))
    return "flags " + "; ".join(parts) + "; the rest: defaults"
