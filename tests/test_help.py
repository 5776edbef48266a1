"""
--help of every script: each flag's description (from the one table in cli/help_table.py), its default
and its group; docs/flags.md generated from the same table and the scripts' parsers, and kept
current.
"""

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest

from guided_diffusion.cli import flags, help_table
from guided_diffusion.errors import ScriptError
from guided_diffusion.script_util import add_dict_to_argparser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs", "flags.md")
GENERATOR = os.path.join(REPO, "docs", "generate_flags.py")


def _load_generator():
    spec = importlib.util.spec_from_file_location("_gd_generate_flags", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()


@pytest.fixture(scope="module")
def parsers():
    return generator.script_parsers(REPO)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def test_every_script_is_found_and_every_flag_is_described(parsers):
    names = [script for script, _ in parsers]
    # Every script of the issue: scripts/*.py, the experiments that run, the evaluator, digits.
    assert "scripts/image_train.py" in names and "scripts/vae_latent_pca.py" in names
    assert {"experiments/digits_report.py", "experiments/guidance_sweep.py",
            "experiments/sampler_fid.py", "evaluations/evaluator.py", "datasets/digits.py"} <= set(names)
    assert not any(n.endswith(("guidance_eval.py", "sampler_fid_lib.py")) for n in names)
    assert {"scripts/npz_to_images.py", "scripts/download_checkpoints.py",
            "evaluations/make_ref_batch.py", "datasets/cifar10.py", "datasets/lsun.py",
            "scripts/image_inpaint.py", "scripts/image_edit.py"} <= set(names)
    assert len(names) >= 26  # scripts are added over time; each must be found and described
    assert generator.undescribed_flags(parsers) == []
    for script, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 15, (script, action.dest)
            if action.option_strings and not action.required and action.default is not None:
                shown = flags.format_default(action.default)
                assert action.help.endswith(f"default: {shown}"), (script, action.dest)


def test_docs_flags_md_is_generated_from_the_table_and_current(parsers):
    with open(DOCS) as f:
        on_disk = f.read()
    assert on_disk == generator.flags_markdown(parsers), (
        "docs/flags.md is stale: run python docs/generate_flags.py > docs/flags.md"
    )
    # It lists each script with its defaults and each flag with its meaning.
    assert "### scripts/cgan_train.py" in on_disk and "### datasets/digits.py" in on_disk
    assert ("| `--image_size` | side of the square images in pixels, or height,width for "
            "rectangles (e.g. 32,48) |") in on_disk
    assert "`--image_size 64`" in on_disk and "`--num_classes 1000`" in on_disk


def test_help_shows_descriptions_defaults_and_groups_in_order():
    module_parser = generator.script_parsers(REPO)
    parser = dict(module_parser)["scripts/classifier_sample.py"]
    text = " ".join(parser.format_help().split())
    assert "side of the square images in pixels, or height,width for rectangles (e.g. 32,48); default: 64" in text
    assert 'default: 16,8' in text and 'timestep_respacing TIMESTEP_RESPACING which of the T' in text
    headings = [g.title for g in parser._action_groups]
    # General options first, then the groups in FLAG_GROUPS order, whatever order the script's
    # defaults came in (classifier_sample starts with sampling flags).
    ours = [h for h in headings if h in flags.FLAG_GROUPS]
    assert ours == [g for g in flags.FLAG_GROUPS if g in ours]
    assert ours[:3] == ["model", "diffusion", "classifier"]
    # Each flag sits under its own group.
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert "classifier_scale" in groups["classifier"] and "seed" in groups["cluster"]


def test_help_from_the_command_line():
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "cgan_sample.py"), "--help"],
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "cGAN: dimension of the generator's noise z; default: 100" in text
    assert "model: the network's shape" in text


def test_new_flag_help_rows_count_and_missing_rows_fail(monkeypatch):
    monkeypatch.setattr(help_table, "NEW_FLAG_HELP", {
        "my_new_flag": ("sampling", "what the new flag does, 50% of the time"),
        "image_size": ("model", "side of the images, overridden"),
        "odd_group_flag": ("newgroup", "a flag of a group the table does not know"),
    })
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, dict(image_size=8, my_new_flag=3, odd_group_flag=True, other=1.5))
    text = " ".join(parser.format_help().split())  # '%' must not break argparse's formatting
    assert "what the new flag does, 50% of the time; default: 3" in text
    assert "side of the images, overridden; default: 8" in text
    groups = [g.title for g in parser._action_groups]
    assert groups.index("model") < groups.index("sampling") < groups.index("newgroup")
    # A flag the table lacks still parses and shows its default, and is reported as missing.
    assert "--other OTHER default: 1.5" in text
    assert parser.parse_args(["--other", "2", "--odd_group_flag", "no"]).odd_group_flag is False
    assert generator.undescribed_flags([("demo.py", parser)]) == ["demo.py: --other"]
    with pytest.raises(ScriptError, match=r"1 flags have no description .*demo.py: --other"):
        generator.flags_markdown([("demo.py", parser)])


def test_evaluator_description_is_whole():
    from guided_diffusion.evaluation.evaluator import create_argparser

    description = create_argparser().description
    assert description.startswith("Evaluate a batch of samples")
    assert "precision and recall" in description and description.endswith("in PyTorch.")


def test_generator_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, GENERATOR, "--root", str(tmp_path)],
        capture_output=True, text=True, env=_env(), timeout=120, cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no scripts under {tmp_path}: run this from a checkout (or pass --root)"
    ]


def test_the_folders_examples_write_into_are_ignored_by_git():
    """The README's, the docs' and the scripts' examples write runs, logs and data sets into the
    checkout; `git status` should not fill up with them."""
    import glob
    import re
    import shutil

    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    files = [os.path.join(REPO, "README.md")] + sorted(
        path for pattern in ("docs/*.md", "scripts/*", "experiments/*.py", "datasets/*.py")
        for path in glob.glob(os.path.join(REPO, pattern)))
    flag = r"(?:--(?:out_dir|log_dir|data_dir|test_dir|val_data_dir)\s+|OPENAI_LOGDIR=)"
    written = set()
    for path in files:
        with open(path) as f:
            for match in re.finditer(flag + r"([A-Za-z0-9_.][^\s`'\")\\]*)", f.read()):
                folder = match.group(1).rstrip("/")
                if "/" in folder or folder.startswith("digits"):
                    written.add(folder)
    assert len(written) > 5  # the walk found the examples
    kept = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching",
                           *(f"{folder}/file" for folder in sorted(written))],
                          cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    not_ignored = [line.split("\t")[-1] for line in kept if line.startswith("::")]
    assert not not_ignored, not_ignored


def test_flags_re_exports_every_family_and_the_help_table():
    # Scripts reach every part of the flag language as flags.X: a family added to
    # cli/families.py but not re-exported would fail only in the script that uses it.
    import inspect

    from guided_diffusion.cli import families

    public = [name for name, value in vars(families).items()
              if inspect.isfunction(value) and not name.startswith("_")]
    assert len(public) > 20
    missing = [name for name in public if getattr(flags, name, None) is not getattr(families, name)]
    assert missing == []
    for name in ("FLAG_HELP", "FLAG_GROUPS", "add_flag", "flag_help", "flag_table"):
        assert getattr(flags, name) is getattr(help_table, name)
