"""
The flag language of the scripts. Its parts live by concern and are all importable from here
(the scripts and the tests use `flags.X`):

- cli/families.py: every flag family's defaults, the reference's and the port's;
- cli/help_table.py: what each flag means and its --help group (FLAG_HELP), and add_flag;
- this module: parsing list-valued and count flags, script descriptions, and taking the network
  flags a checkpoint records (explicit_flags, checkpoint_flags).
"""

from ..errors import ScriptError
from .families import (  # noqa: F401  (re-exported: every family is flags.X)
    arch_defaults,
    augmentation_defaults,
    cfg_defaults,
    channel_defaults,
    classifier_and_diffusion_defaults,
    classifier_defaults,
    classifier_train_defaults,
    ddim_tool_defaults,
    ddim_tool_model_flags,
    diffusion_defaults,
    diffusion_run_defaults,
    diffusion_sampling_defaults,
    diffusion_train_defaults,
    editing_defaults,
    fid_train_defaults,
    label_choice_defaults,
    latent_defaults,
    model_and_diffusion_defaults,
    network_flags,
    output_defaults,
    performance_defaults,
    run_defaults,
    sample_script_defaults,
    sampling_extra_defaults,
    sampling_guidance_defaults,
    training_extra_defaults,
)
from .help_table import (  # noqa: F401  (re-exported)
    FLAG_GROUPS,
    FLAG_HELP,
    add_flag,
    flag_help,
    flag_table,
    format_default,
)


# ---------------------------------------------------------------------- parsing


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


def check_counts(args, *names):
    """
    Refuse a count flag below 1 before any work.

    :param args: the parsed flags.
    :param names: the count flags' names; one the args lack, or left at None (e.g. --limit
        unset: no limit), is not checked.
    :raises ScriptError: naming the flag and its value.
    """
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ScriptError(f"--{name} must be at least 1, got {value}")


def script_description(doc):
    """
    A script's --help description: the first paragraph of its module docstring, on one line.

    :param doc: the script's __doc__.
    """
    return " ".join(doc.strip().split("\n\n")[0].split())


# ---------------------------------------------------------------------- flags a checkpoint records


def explicit_flags(parser, argv=None):
    """
    The flags given on a command line, as opposed to left at their defaults.

    :param parser: the script's argparse parser.
    :param argv: the arguments (None: sys.argv[1:]).
    :return: the set of their dest names.
    """
    unset = object()
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = unset
        parsed = vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default
    return {name for name, value in parsed.items() if value is not unset}


def checkpoint_flags(saved, args, given, keys, path):
    """
    Take the network flags a checkpoint records (cGAN and VAE checkpoints store theirs) instead
    of asking for them again: each of `keys` the checkpoint has replaces the parsed value in
    `args`. A flag given on the command line with another value is refused, naming the
    checkpoint's value, since the weights can only be loaded into the network they came from.

    :param saved: the checkpoint's {flag: value}.
    :param args: the parsed argparse namespace (updated in place).
    :param given: the flags given on the command line (explicit_flags()).
    :param keys: the flags that shape the network.
    :param path: the checkpoint's file name (for the message).
    :return: {flag: value} for every key, the checkpoint's where it has one.
    :raises ScriptError: naming every contradicting flag.
    """
    clashes = [k for k in keys if k in saved and k in given and getattr(args, k) != saved[k]]
    if clashes:
        needed = " ".join(f"--{k} {saved[k]}" for k in clashes)
        passed = " ".join(f"--{k} {getattr(args, k)}" for k in clashes)
        raise ScriptError(
            f"checkpoint {path} was trained with {needed}, not {passed}: drop these flags (the "
            "checkpoint's own values are used) or pass another checkpoint"
        )
    for key in keys:
        if key in saved:
            setattr(args, key, saved[key])
    return {key: getattr(args, key) for key in keys}
