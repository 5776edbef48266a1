"""
The reference's released checkpoints in one table (released.json beside this file): each file's
name and download address, what it is, the flags it loads with, its parameter count, and the
FIDs the reference reports with the commands that sample and evaluate them. The same table drives
scripts/download_checkpoints.py and the generated part of docs/reproduce.md, and a test checks
its flags against the layouts the reference produces (conformance/manifest.json).

    python -m guided_diffusion.data.released --update docs/reproduce.md
"""

import argparse
import functools
import json
import os
import sys

from ..errors import ScriptError
from ..runtime.download import DownloadError, download

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "released.json")
# docs/reproduce.md holds the generated text between these lines.
BEGIN = "<!-- generated from guided_diffusion/data/released.json: do not edit by hand -->"
END = "<!-- end of generated text -->"


@functools.lru_cache(maxsize=None)
def released_table():
    """The parsed released.json: {"base_url", "checkpoints": [...], "results": [...], ...}."""
    with open(TABLE_PATH) as f:
        return json.load(f)


def checkpoints():
    """{name: entry} of every released checkpoint, in the table's order."""
    return {entry["name"]: entry for entry in released_table()["checkpoints"]}


def resolve_names(names):
    """
    The checkpoint entries for the names a user gave ("all" = every one; "x.pt" = "x").

    :raises ScriptError: naming every unknown name and the known ones, before anything is done.
    """
    table = checkpoints()
    if not names:
        raise ScriptError(f"name the checkpoints to download, or all: {', '.join(table)}")
    wanted = []
    for name in names:
        if name == "all":
            wanted.extend(table)
            continue
        wanted.append(name[: -len(".pt")] if name.endswith(".pt") else name)
    unknown = [name for name in wanted if name not in table]
    if unknown:
        raise ScriptError(
            f"no released checkpoint named {', '.join(unknown)}: the names are "
            f"{', '.join(table)} (or all)"
        )
    return [table[name] for name in dict.fromkeys(wanted)]


def check_torch_file(path):
    """
    Refuse a download that is no PyTorch checkpoint (an error page served with status 200, a
    truncated file): torch.save writes a zip archive (or, before torch 1.6, a pickle).
    """
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return
    shown = head[:24].decode("ascii", "replace").replace("\n", " ")
    raise DownloadError(f"not a PyTorch checkpoint (it starts with {shown!r})")


def fetch_checkpoints(names, out_dir, base_url=None, table=None, log=print, progress=True):
    """
    Download released checkpoints into out_dir, each resumable and verified (runtime.download):
    the length the server announces, the size and SHA-256 where the table knows them (the
    reference publishes neither, so they are null in released.json), and that the file is a
    PyTorch checkpoint. Files already in out_dir are kept.

    :param names: checkpoint names (or "all"); every name is checked before anything downloads.
    :param base_url: a mirror to download from instead of each entry's url (file names kept).
    :param table: {name: entry} (default: released.json's checkpoints).
    :param log: where one line per file goes.
    :return: the paths of the checkpoints, in the order asked.
    """
    entries = resolve_names(names) if table is None else _resolve_in(names, table)
    paths = []
    for entry in entries:
        dest = os.path.join(out_dir, entry["file"])
        paths.append(dest)
        if os.path.exists(dest):
            log(f"{dest} is already there")
            continue
        url = entry["url"] if not base_url else base_url.rstrip("/") + "/" + entry["file"]
        log(f"downloading {url} (about {format_bytes(approx_size(entry))}) to {dest}")
        download(url, dest, expected_bytes=entry.get("bytes"), sha256=entry.get("sha256"),
                 check=check_torch_file, progress=_bar(entry["file"]) if progress else None)
        log(f"{dest}: {format_bytes(os.path.getsize(dest))}, verified")
    return paths


def _resolve_in(names, table):
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ScriptError(f"no checkpoint named {', '.join(unknown)}: the names are {', '.join(table)}")
    return [table[n] for n in names]


def _bar(label):
    from tqdm.auto import tqdm

    state = {}

    def update(done, total):
        if "bar" not in state:
            state["bar"] = tqdm(total=total, initial=0, unit="B", unit_scale=True, desc=label)
            state["last"] = 0
        state["bar"].update(done - state["last"])
        state["last"] = done
        if total is not None and done >= total:
            state["bar"].close()

    return update


def approx_size(entry):
    """The file's expected size in bytes: its parameters as float32 (plus a little pickling)."""
    return 4 * entry["num_params"]


def format_bytes(count):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def row_checkpoints(result):
    """The checkpoint names a reported result samples with, in the order they are used."""
    return [result[k] for k in ("classifier", "base", "model") if result.get(k)]


def results():
    """{key: row} of the reported results (released.json's "results"), in the table's order."""
    return {row["key"]: row for row in released_table()["results"]}


def row_stages(result, table=None, *, models="models", runs="runs", extra=()):
    """
    The sampling commands of one reported result, as data: a list of
    {"script": "classifier_sample.py", "args": [...], "out": folder, "npz": samples path}, run
    in order (the upsampling rows sample their base images first).

    :param models: the folder holding the checkpoints.
    :param runs: the folder the stages' log folders go in: runs/<model name> for one stage,
        runs/base and runs/upsampled for the upsampling rows.
    :param extra: flags appended to every stage (argparse keeps the last value of a flag given
        twice, so they win over the paper's).
    """
    table = table or checkpoints()
    model = table[result["model"]]
    extra = [str(word) for word in extra]
    sample = result["sample_flags"].split() + extra
    count = _flag(sample, "--num_samples")

    def npz(folder, entry):
        side = _large_side(entry)
        return f"{folder}/samples_{count}x{side}x{side}x3.npz"

    if result["script"] == "super_res_sample.py":
        base = table[result["base"]]
        classifier = table[result["classifier"]]
        base_out, up_out = f"{runs}/base", f"{runs}/upsampled"
        base_npz = npz(base_out, base)
        first = [*base["flags"].split(), *_without_image_size(classifier["flags"]).split(),
                 "--classifier_scale", "1.0", "--classifier_path", f"{models}/{classifier['file']}",
                 "--model_path", f"{models}/{base['file']}", *sample, "--log_dir", base_out]
        second = [*model["flags"].split(), "--model_path", f"{models}/{model['file']}",
                  "--base_samples", base_npz, *sample, "--log_dir", up_out]
        return [
            {"script": "classifier_sample.py", "args": first, "out": base_out, "npz": base_npz},
            {"script": "super_res_sample.py", "args": second, "out": up_out,
             "npz": npz(up_out, model)},
        ]
    args = model["flags"].split()
    if result.get("classifier"):
        classifier = table[result["classifier"]]
        args += [*_without_image_size(classifier["flags"]).split(), *result["extra"].split(),
                 "--classifier_path", f"{models}/{classifier['file']}"]
    out = f"{runs}/{model['name']}"
    args += ["--model_path", f"{models}/{model['file']}", *sample, "--log_dir", out]
    return [{"script": result["script"], "args": args, "out": out, "npz": npz(out, model)}]


def _flag(words, name):
    """The last value of --name in a list of command-line words."""
    values = [words[i + 1] for i, word in enumerate(words[:-1]) if word == name]
    if not values:
        raise ValueError(f"no {name} among {' '.join(words)}")
    return values[-1]


def sample_command(result, table=None):
    """The sampling command of one reported result (a "results" row of the table)."""
    return [f"mpiexec -n 8 python scripts/{stage['script']} {' '.join(stage['args'])}"
            for stage in row_stages(result, table)]


def has_checkpoints(result, table=None):
    """Whether every checkpoint a result needs has an entry in the table."""
    table = table or checkpoints()
    return all(name in table for name in row_checkpoints(result))


def _without_image_size(flags):
    # The classifier shares the model's --image_size, which the model flags already give.
    words = flags.split()
    if "--image_size" in words:
        at = words.index("--image_size")
        del words[at : at + 2]
    return " ".join(words)


def reproduce_markdown():
    """The generated part of docs/reproduce.md: the checkpoint table, the results, training."""
    doc = released_table()
    table = checkpoints()
    out = [BEGIN, "", "### The released checkpoints", ""]
    out += [
        "| file | what | size (float32 parameters) | sampled with | flags |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in table.values():
        out.append(
            f"| [`{entry['file']}`]({entry['url']}) | {entry['what']} | "
            f"{entry['num_params'] / 1e6:.1f}M, about {format_bytes(approx_size(entry))} | "
            f"`{entry['script']}` | `{entry['flags']}` |"
        )
    out += ["", "### The FIDs the reference reports, and the commands that produce them", ""]
    out += ["| result | `--row` | FID | precision | recall | reference batch |",
            "| --- | --- | --- | --- | --- | --- |"]
    rows = [result for result in doc["results"] if has_checkpoints(result, table)]
    for result in rows:
        out.append(
            f"| {result['row']} | `{result['key']}` | {_figure(result['fid'])} | "
            f"{_figure(result['precision'])} | {_figure(result['recall'])} "
            f"| {_ref_link(result)} |"
        )
    for result in rows:
        stages = row_stages(result, table)
        out += ["", f"**{result['row']}** (FID {_figure(result['fid'])}):", "", "```bash"]
        if result.get("make_ref_batch"):
            out.append(result["make_ref_batch"])
        out += sample_command(result, table)
        out.append(f"python evaluations/evaluator.py {ref_name(result)} {stages[-1]['npz']}")
        out.append(f"# or all of it: python scripts/reproduce.py --row {result['key']}")
        out.append("```")
    out += ["", "### Training settings of the paper", "", doc["training_note"], ""]
    out += ["| configuration | model size | batch | lr | EMA | iterations | dropout | schedule "
            "| fp16 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in doc["training"]:
        out.append(
            f"| {row['config']} | {row['model_size_m']}M | {row['batch_size']} | {_lr(row['lr'])} "
            f"| {row['ema_rate']} | {row['iterations']} | {row['dropout']} | "
            f"{row['noise_schedule']} | {'yes' if row['fp16'] else 'no'} |"
        )
    out += ["", END]
    return "\n".join(out) + "\n"


def _figure(value):
    return "not given" if value is None else f"{value:.2f}"


def ref_name(result):
    """The file name of a result's reference batch (the one make_ref_batch writes when the
    reference published none)."""
    if result.get("ref_batch"):
        return result["ref_batch"].rsplit("/", 1)[1]
    return result["make_ref_batch"].split()[3]


def _ref_link(result):
    if result.get("ref_batch"):
        return f"[`{ref_name(result)}`]({result['ref_batch']})"
    return f"none published: make `{ref_name(result)}` (below)"


def _lr(value):
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _large_side(entry):
    flags = entry["flags"].split()
    for name in ("--large_size", "--image_size"):
        if name in flags:
            return flags[flags.index(name) + 1]
    raise ValueError(f"{entry['name']} has no image size flag")


def replace_generated(text):
    """`text` (docs/reproduce.md) with its generated part brought up to date."""
    if BEGIN not in text or END not in text:
        raise ScriptError("docs/reproduce.md has lost its generated-text markers")
    head = text.split(BEGIN, 1)[0]
    tail = text.split(END, 1)[1]
    return head + reproduce_markdown().rstrip("\n") + tail


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m guided_diffusion.data.released",
        description="Print, or update in place, the generated part of docs/reproduce.md.",
    )
    parser.add_argument("--update", default="", help="the docs/reproduce.md file to update")
    args = parser.parse_args(argv)
    if not args.update:
        sys.stdout.write(reproduce_markdown())
        return
    with open(args.update) as f:
        text = f.read()
    with open(args.update, "w") as f:
        f.write(replace_generated(text))


if __name__ == "__main__":
    main()
