"""
scripts/reproduce.py --row (guided_diffusion/evaluation/reproduce.py), end to end on CPU:

- what the test covers: the ADM-G + ADM-U row (classifier-guided 64x64 base samples, then the
  64->256 upsampler) with random-weight checkpoints built from the released flags of the three
  checkpoints, except that --extra_flags shrinks width and depth (the released sizes would take
  hours on a CPU and gigabytes of files), at 4 samples and 2 steps, with random Inception
  weights. The figures printed beside the paper's are checked against the Inception features of
  the written samples by an independent low-rank FID formula. Not run on real weights here;
- a run stopped by SIGTERM in the upsampling stage exits 75 and the same command continues it
  (the base stage is reused, the upsampling stage continues from its kept batch);
- the row table (keys, figures, flags) matches docs/reproduce.md and the reference README's
  figures; missing checkpoints, reference batches and Inception weights are refused in one line
  naming what to download.
"""

import inspect
import os
import re
import signal

import numpy as np
import pytest
import torch

from guided_diffusion.cli.main import run_main
from guided_diffusion.data import released
from guided_diffusion.evaluation import reproduce
from guided_diffusion.evaluation.inception import load_inception
from guided_diffusion.runtime import kept_rounds
from guided_diffusion.sampling import loop
from guided_diffusion.script_util import (
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

from test_inception import he_initialised_model
from test_proxy_fid import frechet_low_rank
from test_scripts import load_script

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Smaller networks of the released layouts (widths keep the 64-channel attention heads whole).
SHRINK = ("--num_channels 32 --num_head_channels 32 --num_res_blocks 1 --use_fp16 False "
          "--classifier_width 64 --classifier_depth 1")
ROW = "adm_u_256"


def parsed(script, words):
    return load_script(script).create_argparser().parse_args([str(w) for w in words])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Random-weight checkpoints of the row's three networks, a reference batch, Inception."""
    root = tmp_path_factory.mktemp("reproduce")
    models = root / "models"
    models.mkdir()
    plan_args = dict(checkpoint_dir=str(models), ref_batch=__file__, extra_flags=SHRINK)
    table = released.checkpoints()
    row = released.results()[ROW]
    torch.manual_seed(0)
    # The stage commands give each network's flags exactly as the sampling scripts read them.
    for name in released.row_checkpoints(row):
        (models / table[name]["file"]).touch()  # so the plan can be made; filled in below
    plan = reproduce.plan_row(ROW, **plan_args)
    reproduce.fit_extra_flags(plan, [load_script(s["script"][:-3]).create_argparser()
                                     for s in plan.stages])
    stages = plan.stages
    base = parsed("classifier_sample", stages[0]["args"])
    classifier_flags = args_to_dict(base, classifier_defaults().keys())
    classifier_flags.update(num_classes=base.num_classes, classifier_channel_mult="")
    torch.save(create_classifier(**classifier_flags).state_dict(),
               models / table[row["classifier"]]["file"])
    torch.save(build(create_model_and_diffusion, model_and_diffusion_defaults(), base).state_dict(),
               models / table[row["base"]]["file"])
    up = parsed("super_res_sample", stages[1]["args"])
    upsampler = build(sr_create_model_and_diffusion, sr_model_and_diffusion_defaults(), up)
    torch.save(upsampler.state_dict(), models / table[row["model"]]["file"])
    ref = root / released.ref_name(row)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    np.savez(ref, arr_0=images)
    weights = root / "inception.pth"
    torch.save(he_initialised_model().state_dict(), weights)
    return {"models": models, "ref": ref, "weights": weights, "ref_images": images}


def build(create, defaults, args):
    """The network a sampling script builds from its parsed flags (random weights)."""
    flags = args_to_dict(args, defaults.keys())
    accepted = inspect.signature(create).parameters  # the super-res factory has no DiT flags
    flags.update({name: getattr(args, name) for name in loop._ADDED_MODEL_FLAGS
                  if hasattr(args, name) and name in accepted})
    return create(**flags)[0]


def argv(inputs, out):
    return ["--row", ROW, "--checkpoint_dir", inputs["models"], "--ref_dir",
            os.path.dirname(inputs["ref"]), "--out_dir", out, "--num_samples", 4,
            "--batch_size", 2, "--timestep_respacing", 2, "--extra_flags", SHRINK,
            "--inception_path", inputs["weights"], "--device", "cpu"]


def run(args):
    try:
        status = run_main(load_script("reproduce").main, [str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    return status or 0


def printed_figures(out):
    """{name: (paper, ours)} from the comparison lines."""
    found = {}
    for line in out.splitlines():
        match = re.fullmatch(r"(FID|Precision|Recall|sFID|Inception Score)\s+(\S+)\s+(\S+)", line)
        if match:
            found[match.group(1)] = (match.group(2), float(match.group(3)))
    return found


def signal_in_upsampling(monkeypatch):
    """SIGTERM to this process while the upsampling stage gathers its first batch (once)."""
    real = kept_rounds.KeptRounds._collect
    sent = []

    def collect(self, parts, streams, i, write):
        if not sent and "upsampled" in (self.folder or ""):
            sent.append(i)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, parts, streams, i, write)

    monkeypatch.setattr(kept_rounds.KeptRounds, "_collect", collect)
    return sent


def test_a_row_end_to_end_stops_continues_and_prints_the_papers_figures_beside_ours(
        inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    sent = signal_in_upsampling(monkeypatch)
    assert run(argv(inputs, out)) == 75 and sent == [0]
    assert (out / "base" / "samples_4x64x64x3.npz").exists()
    assert not (out / "upsampled" / "samples_4x256x256x3.npz").exists()
    capsys.readouterr()
    monkeypatch.undo()

    assert run(argv(inputs, out)) == 0  # the same command continues
    printed = capsys.readouterr().out
    assert f"{out / 'base' / 'samples_4x64x64x3.npz'} is already sampled: reused" in printed
    figures = printed_figures(printed)
    assert figures["FID"][0] == "3.94" and figures["Precision"][0] == "0.83"
    assert figures["Recall"][0] == "0.53" and figures["sFID"][0] == "-"
    assert "not the paper's setting" in printed
    with np.load(out / "upsampled" / "samples_4x256x256x3.npz") as result:
        samples, labels = result["arr_0"], result["arr_1"]
    assert samples.shape == (4, 256, 256, 3) and labels.shape == (4,)
    # The printed FID is that of the written samples, by an independent formula.
    inception = load_inception(str(inputs["weights"]))
    with torch.no_grad():
        ours = inception(torch.from_numpy(samples))[0].double().numpy()
        ref = inception(torch.from_numpy(inputs["ref_images"]))[0].double().numpy()
    assert figures["FID"][1] == pytest.approx(frechet_low_rank(ours, ref), rel=1e-3)



# ------------------------------------------------------------------ refusals and the table


def one_line(capsys, args):
    assert run(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_inputs_are_named_with_what_to_download(inputs, tmp_path, capsys):
    good = argv(inputs, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = list(good)
    args[args.index("--checkpoint_dir") + 1] = empty
    line = one_line(capsys, args)
    assert (f"needs {empty}/64x64_classifier.pt, {empty}/64x64_diffusion.pt, "
            f"{empty}/64_256_upsampler.pt: download with python scripts/download_checkpoints.py "
            f"64x64_classifier 64x64_diffusion 64_256_upsampler --out_dir {empty}") in line
    args = list(good)
    args[args.index("--ref_dir") + 1] = empty
    line = one_line(capsys, args)
    assert f"needs the reference batch {empty}/VIRTUAL_imagenet256_labeled.npz: download " \
           "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/" \
           "256/VIRTUAL_imagenet256_labeled.npz" in line
    args = list(good)
    args[args.index("--inception_path") + 1] = empty / "none.pth"
    assert "--inception_path" in one_line(capsys, args)
    args[args.index("--inception_path") + 1] = inputs["ref"]  # an npz, not weights
    assert "is not a PyTorch state dict" in one_line(capsys, args)
    for bad, expected in (("nope", "the rows are adm_g_64, adm_g_128"), ("", "--row (none)")):
        args = list(good)
        args[args.index("--row") + 1] = bad
        assert expected in one_line(capsys, args)
    args = list(good)
    args[args.index("--num_samples") + 1] = -1
    assert "--num_samples and --batch_size must be at least 1" in one_line(capsys, args)
    args = list(good)
    args[args.index("--extra_flags") + 1] = "--no_such_flag 3"
    assert "--no_such_flag" in one_line(capsys, args)
    assert not (tmp_path / "out").exists()  # nothing was made


@pytest.mark.parametrize("flag", ["--num_samples", "--batch_size"])
def test_counts_must_be_integers(flag, capsys):
    assert run(["--row", ROW, flag, "many"]) == 2
    assert f"argument {flag}: invalid int value: 'many'" in capsys.readouterr().err


def test_list_names_every_row(capsys):
    assert run(["--list", "True"]) == 0
    keys = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert keys == list(released.results())
    assert keys[:9] == ["adm_g_64", "adm_g_128", "adm_g_256", "adm_g_512", "adm_u_256",
                        "adm_u_512", "lsun_bedroom", "lsun_cat", "lsun_horse"]
    assert {"id_cifar10", "id_imagenet64"} <= set(keys)


# The reference README's results tables (openai/guided-diffusion, "Results"), typed in by hand:
# the independent record the row table is checked against.
README = {
    "adm_g_64": (2.07, 0.74, 0.63), "adm_g_128": (2.97, 0.78, 0.59),
    "adm_g_256": (4.59, 0.82, 0.52), "adm_g_512": (7.72, 0.87, 0.42),
    "adm_u_256": (3.94, 0.83, 0.53), "adm_u_512": (3.85, 0.84, 0.53),
    "lsun_bedroom": (1.90, 0.66, 0.51), "lsun_cat": (5.57, 0.63, 0.52),
    "lsun_horse": (2.57, 0.71, 0.55),
}
# Nichol & Dhariwal 2021 ("Improved DDPM", arXiv 2102.09672), its ablation tables, typed in by
# hand: the L_hybrid cosine 4000-step rows of the released checkpoints' recipes. The paper gives
# FID and NLL there, no precision or recall.
IMPROVED_DDPM = {"id_cifar10": (3.19, None, None), "id_imagenet64": (19.2, None, None)}


def test_the_row_table_matches_the_readme_and_docs_reproduce_md():
    rows = released.results()
    for key, figures in {**README, **IMPROVED_DDPM}.items():
        assert (rows[key]["fid"], rows[key]["precision"], rows[key]["recall"]) == figures
    with open(os.path.join(REPO, "docs", "reproduce.md")) as f:
        docs = f.read()
    for key, row in rows.items():
        if not released.has_checkpoints(row):
            continue  # its checkpoint entries come with the improved-diffusion table
        fid, precision, recall = (("not given" if v is None else f"{v:.2f}")
                                  for v in (row["fid"], row["precision"], row["recall"]))
        assert f"| {row['row']} | `{key}` | {fid} | {precision} | {recall} |" in docs
        assert f"python scripts/reproduce.py --row {key}\n" in docs
    for key, (fid, _, _) in IMPROVED_DDPM.items():  # the source names the paper's table
        assert "2102.09672" in rows[key]["source"] and f"FID {fid}" in rows[key]["source"]
