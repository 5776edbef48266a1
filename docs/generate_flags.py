"""
Write docs/flags.md, the flag reference of every script, from the one table of what each flag
means (guided_diffusion/cli/help_table.py) and the scripts' own parsers:

    python docs/generate_flags.py > docs/flags.md

It lives beside the docs rather than in the library because it loads the scripts by file path,
which the installed package must never do (tests/test_architecture.py checks that).
tests/test_help.py fails when docs/flags.md is stale or a flag has no description.
"""

import argparse
import glob
import importlib.util
import os
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)  # the checkout's own package, when it is not installed

from guided_diffusion.cli import flags  # noqa: E402
from guided_diffusion.errors import ScriptError  # noqa: E402

# Where the scripts live, relative to a checkout (the parsers docs/flags.md describes).
SCRIPT_PATTERNS = ("scripts/*.py", "experiments/*.py", "evaluations/*.py", "datasets/*.py")


def script_parsers(root="."):
    """
    Every script's argparse parser, read from a checkout: the files of SCRIPT_PATTERNS that run
    as a program (an `if __name__ == "__main__"` block), each through its create_argparser().

    :param root: the checkout's folder.
    :return: [(path relative to root, parser)], in SCRIPT_PATTERNS order then by name.
    :raises ScriptError: when there are no scripts under root, or one has no create_argparser.
    """
    found = []
    for pattern in SCRIPT_PATTERNS:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            with open(path) as f:
                if '__name__ == "__main__"' not in f.read():
                    continue  # a helper module next to the scripts
            found.append(path)
    if not found:
        raise ScriptError(f"no scripts under {os.path.abspath(root)}: run this from a checkout "
                          "(or pass --root)")
    parsers = []
    for path in found:
        module = _load_script(path)
        if not hasattr(module, "create_argparser"):
            raise ScriptError(f"{path} has no create_argparser(): docs/flags.md cannot list its "
                              "flags")
        parsers.append((os.path.relpath(path, root), module.create_argparser()))
    return parsers


def _load_script(path):
    # A script imports its neighbours (experiments/guidance_eval.py) as top-level modules, as it
    # does when run, so its folder is on sys.path while it loads.
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(
        f"_gd_script_{os.path.basename(folder)}_{stem}", path
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def _arguments(parser):
    """(name, action) of a parser's arguments, without --help."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        yield action.dest, action


def undescribed_flags(parsers):
    """
    The flags of the parsers that the table does not describe.

    :param parsers: [(script, parser)].
    :return: sorted "script: --flag" strings (empty when every flag is described).
    """
    table = flags.flag_table()
    missing = set()
    for script, parser in parsers:
        for name, action in _arguments(parser):
            if name not in table:
                shown = action.option_strings[0] if action.option_strings else name
                missing.add(f"{script}: {shown}")
    return sorted(missing)


def flags_markdown(parsers):
    """
    docs/flags.md: what every flag means, by group, then every script's flags and defaults.

    :param parsers: [(script path, argparse parser)], e.g. script_parsers().
    :return: the Markdown text.
    :raises ScriptError: naming the flags without a row in the table.
    """
    missing = undescribed_flags(parsers)
    if missing:
        raise ScriptError(
            f"{len(missing)} flags have no description in guided_diffusion/cli/help_table.py "
            f"(FLAG_HELP or NEW_FLAG_HELP): {', '.join(missing)}"
        )
    table = flags.flag_table()
    users = {}
    for script, parser in parsers:
        for name, _ in _arguments(parser):
            users.setdefault(name, []).append(_short(script))
    groups = _ordered_groups({table[name][0] for name in users})

    lines = [
        "# Flags of every script",
        "",
        "What each flag means, grouped as in `--help`, then each script's flags with their",
        "defaults. Generated from the descriptions in `guided_diffusion/cli/help_table.py`",
        "(`FLAG_HELP`) and the scripts' parsers by",
        "",
        "```bash",
        "python docs/generate_flags.py > docs/flags.md",
        "```",
        "",
        "Edit the table, not this file: `tests/test_help.py` fails when this file is stale or a",
        "flag has no description. Every script also prints its own with `--help`.",
        "",
        "## What each flag means",
    ]
    for group in groups:
        lines += ["", f"### {group}", "", _heading(group) + ".", "",
                  "| flag | meaning | scripts |", "| --- | --- | --- |"]
        for name in sorted(n for n in users if table[n][0] == group):
            lines.append(f"| `{_shown_name(name, parsers)}` | {_cell(table[name][1])} | "
                         f"{_cell(_who(users[name], len(parsers)))} |")
    lines += ["", "## Each script's flags and defaults"]
    for script, parser in parsers:
        lines += ["", f"### {script}", ""]
        if parser.description:
            lines += [" ".join(parser.description.split()), ""]
        lines += ["| group | flags (default) |", "| --- | --- |"]
        by_group = {}
        for name, action in _arguments(parser):
            by_group.setdefault(table[name][0], []).append(_with_default(action))
        for group in _ordered_groups(by_group):
            lines.append(f"| {group} | {_cell(', '.join(by_group[group]))} |")
    return "\n".join(lines) + "\n"


def _ordered_groups(names):
    known = [g for g in flags.FLAG_GROUPS if g in names]
    return known + sorted(set(names) - set(known))


def _heading(group):
    text = flags.FLAG_GROUPS.get(group, group)
    return text[0].upper() + text[1:]


def _short(script):
    return os.path.splitext(os.path.basename(script))[0]


def _shown_name(name, parsers):
    for _, parser in parsers:
        for dest, action in _arguments(parser):
            if dest == name:
                return action.option_strings[0] if action.option_strings else name.upper()
    return name


def _who(scripts, total):
    scripts = sorted(set(scripts))
    if len(scripts) == total:
        return "all"
    return ", ".join(scripts)


def _with_default(action):
    if not action.option_strings:
        return f"`{action.dest.upper()}` (positional)"
    flag = action.option_strings[0]
    if action.required:
        return f"`{flag}` (required)"
    if action.default is None:
        return f"`{flag}`"
    return f"`{flag} {flags.format_default(action.default)}`"


def _cell(text):
    return text.replace("|", "\\|")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python docs/generate_flags.py",
        description="Print the flag reference (docs/flags.md) of a checkout's scripts.",
    )
    parser.add_argument("--root", default=CHECKOUT,
                        help="the checkout (default: the one holding this file)")
    args = parser.parse_args(argv)
    sys.stdout.write(flags_markdown(script_parsers(args.root)))


if __name__ == "__main__":
    from guided_diffusion.cli.main import run_main

    run_main(main)
