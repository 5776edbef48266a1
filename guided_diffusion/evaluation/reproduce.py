"""
One command per paper row (scripts/reproduce.py --row KEY; docs/reproduce.md): the plan of a
row, checked before any work, and the comparison of its figures with the paper's.

A row is a "results" entry of guided_diffusion/data/released.json: its paper figures (FID,
precision, recall), the checkpoints it samples with, the paper's sampling flags and its
reference batch. plan_row turns it into the sampling commands (data.released.row_stages) with
the files they need under --checkpoint_dir and --ref_dir, refusing in one line what is missing
and naming the command that downloads it. The script runs the stages through the sampling
scripts' own main (resumable: each stage keeps its finished batches, and a finished stage is
reused), then evaluates with the PyTorch evaluator and prints the paper's figures beside ours.
"""

import os

from ..data.released import checkpoints, ref_name, results, row_checkpoints, row_stages
from ..errors import ScriptError

__all__ = ["RowPlan", "plan_row", "fit_extra_flags", "list_rows", "compare_lines", "NOT_THE_PAPERS"]

# What the shrinking options make of a run, said wherever they are used.
NOT_THE_PAPERS = ("not the paper's setting: the figures are not comparable with the paper's "
                  "(a test or smoke run)")


class RowPlan:
    """
    What reproducing one row does.

    :ivar row: the released.json results entry.
    :ivar stages: [{"script", "args", "out", "npz"}] to run in order (paths resolved).
    :ivar ref_batch: the reference batch's path.
    :ivar changed: the paper's settings this run overrides (flag words), [] for the paper's run.
    """

    def __init__(self, row, stages, ref_batch, changed):
        self.row = row
        self.stages = stages
        self.ref_batch = ref_batch
        self.changed = changed

    @property
    def samples(self):
        """The npz the row is evaluated on (the last stage's)."""
        return self.stages[-1]["npz"]


def _known_row(key):
    table = results()
    if key not in table:
        raise ScriptError(f"--row {key or '(none)'}: the rows are {', '.join(table)} "
                          "(python scripts/reproduce.py --list True)")
    row = table[key]
    missing = [name for name in row_checkpoints(row) if name not in checkpoints()]
    if missing:
        raise ScriptError(f"--row {key}: released.json has no checkpoint entry for "
                          f"{', '.join(missing)}")
    return row


def plan_row(key, *, checkpoint_dir="models", ref_dir=".", ref_batch="", out_dir="",
             num_samples=0, timestep_respacing="", batch_size=0, extra_flags=""):
    """
    The plan of row `key`, with every input checked (nothing is run or written).

    :param checkpoint_dir: where the released checkpoints are (their file names).
    :param ref_dir: where the reference batch is (its file name), unless ref_batch is given.
    :param ref_batch: the reference batch's path ("" = ref_dir/<its file name>).
    :param out_dir: where the stages' folders go ("" = runs/reproduce/<key>).
    :param num_samples, timestep_respacing, batch_size: 0/"" = the paper's; otherwise they
        replace the paper's value (num_samples, timestep_respacing: NOT_THE_PAPERS).
    :param extra_flags: more flags for every stage, winning over the paper's (tests shrink
        the networks with them: NOT_THE_PAPERS).
    :raises ScriptError: one line naming what to download or make, or the flag to fix.
    """
    row = _known_row(key)
    if num_samples < 0 or batch_size < 0:
        raise ScriptError(f"--num_samples and --batch_size must be at least 1 (0 = the "
                          f"paper's), got {num_samples} and {batch_size}")
    table = checkpoints()
    missing = [name for name in row_checkpoints(row)
               if not os.path.isfile(os.path.join(checkpoint_dir, table[name]["file"]))]
    if missing:
        files = ", ".join(os.path.join(checkpoint_dir, table[n]["file"]) for n in missing)
        raise ScriptError(
            f"--row {key} needs {files}: download with python scripts/download_checkpoints.py "
            f"{' '.join(missing)} --out_dir {checkpoint_dir} (or pass --checkpoint_dir)"
        )
    ref = ref_batch or os.path.join(ref_dir, ref_name(row))
    if not os.path.isfile(ref):
        how = (f"download {row['ref_batch']}" if row.get("ref_batch")
               else f"make it with {row['make_ref_batch']}")
        raise ScriptError(f"--row {key} needs the reference batch {ref}: {how} (or pass "
                          "--ref_dir / --ref_batch)")
    changed = []
    if num_samples:
        changed += ["--num_samples", str(num_samples)]
    if timestep_respacing:
        changed += ["--timestep_respacing", timestep_respacing]
    shrink = list(changed)
    if batch_size:
        shrink += ["--batch_size", str(batch_size)]  # changes the random draws, not the setting
    runs = out_dir or os.path.join("runs", "reproduce", key)
    stages = row_stages(row, table, models=checkpoint_dir, runs=runs, extra=shrink)
    for stage in stages:
        # The paper's command with the shrinking flags every script has; fit_extra_flags adds
        # the --extra_flags each stage's script takes.
        assert stage["args"][-2] == "--log_dir"
        stage["paper_args"] = stage["args"][:-2]
    plan = RowPlan(row, stages, ref, changed + extra_flags.split())
    plan.extra = extra_flags.split()
    return plan


def list_rows():
    """One line per row: key, what it is, the paper's FID, the checkpoints and reference."""
    lines = []
    table = checkpoints()
    for key, row in results().items():
        names = row_checkpoints(row)
        fid = "not given" if row["fid"] is None else f"{row['fid']:.2f}"
        absent = [n for n in names if n not in table]
        note = f" (no checkpoint entry yet for {', '.join(absent)})" if absent else ""
        lines.append(f"{key}: {row['row']}; paper FID {fid}; checkpoints "
                     f"{', '.join(names)}; reference batch {ref_name(row)}{note}")
    return lines


def _options(parser):
    return {option for action in parser._actions for option in action.option_strings}


def fit_extra_flags(plan, parsers):
    """
    Give each stage only those of --extra_flags its script has (the classifier's flags mean
    nothing to the upsampler), refusing a flag no stage has: a misspelt flag must not be
    dropped in silence.

    :param parsers: the argparse parser of each stage's script, in stage order.
    :raises ScriptError: naming the unknown flag.
    """
    extra = plan.extra
    pairs = [extra[i:i + 2] for i in range(0, len(extra), 2)]
    if any(len(pair) != 2 or not pair[0].startswith("--") for pair in pairs):
        raise ScriptError(f"--extra_flags {' '.join(extra)}: give flag-value pairs, e.g. "
                          "--extra_flags '--num_channels 64'")
    known = [_options(parser) for parser in parsers]
    unknown = [flag for flag, _ in pairs if not any(flag in options for options in known)]
    if unknown:
        scripts = ", ".join(stage["script"] for stage in plan.stages)
        raise ScriptError(f"--extra_flags: {', '.join(unknown)} is a flag of none of {scripts}")
    for stage, options in zip(plan.stages, known):
        kept = [word for flag, value in pairs if flag in options for word in (flag, value)]
        stage["args"] = stage["paper_args"] + kept + ["--log_dir", stage["out"]]


# The figures the paper reports, and the evaluator's names for them.
PAPER_FIGURES = (("fid", "FID"), ("precision", "Precision"), ("recall", "Recall"))


def compare_lines(plan, ours):
    """
    The paper's figures beside ours.

    :param ours: the evaluator's results ({"FID": ..., "Precision": ..., ...}).
    """
    row = plan.row
    count = os.path.basename(plan.samples)
    lines = [f"{row['row']} (--row {row['key']}), {count} against {plan.ref_batch}:",
             f"{'':12}{'paper':>10}{'ours':>12}"]
    for key, name in PAPER_FIGURES:
        paper = "-" if row[key] is None else f"{row[key]:.2f}"
        lines.append(f"{name:12}{paper:>10}{ours[name]:>12.4f}")
    for name in ("Inception Score", "sFID"):
        lines.append(f"{name:12}{'-':>10}{ours[name]:>12.4f}")
    if plan.changed:
        lines.append(f"run with {' '.join(plan.changed)}: {NOT_THE_PAPERS}")
    return lines
