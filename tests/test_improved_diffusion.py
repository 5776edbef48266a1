"""
improved-diffusion's released checkpoints (openai/improved-diffusion, march-2021): listed in
released.json with the flags this port needs, every layout built from those flags at full size on
the meta device and compared, key by key, with the layout *their* code builds from *their* README
flags (tests/data/improved_diffusion_manifest.json, written by
tests/data/make_improved_diffusion_manifest.py), and the 4000-step "only noise" trap
(improved-diffusion#13) named before sampling.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from guided_diffusion.cli import hints
from guided_diffusion.cli.main import run_main
from guided_diffusion.cli.weights import check_model_weights
from guided_diffusion.data import released
from guided_diffusion.runtime.run_record import describe_run, write_run_record
from guided_diffusion.script_util import (
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

REPO = Path(__file__).resolve().parent.parent
ORACLE = json.loads((REPO / "tests" / "data" / "improved_diffusion_manifest.json").read_text())
IMPROVED_URL = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"
# Their README's "Models and Hyperparameters" list, in its order.
README_ORDER = [
    "imagenet64_uncond_100M_1500K", "cifar10_uncond_50M_500K", "imagenet64_cond_270M_250K",
    "upsample_cond_500K", "lsun_uncond_100M_1200K_bs128", "lsun_uncond_100M_2400K_bs64",
    "imagenet64_uncond_vlb_100M_1500K", "cifar10_uncond_vlb_50M_500K",
]
ADDED_MODEL_FLAGS = ("num_classes", "channel_mult", "class_dropout_prob", "in_channels")

pytestmark = pytest.mark.usefixtures("single_thread")


def improved():
    return {n: e for n, e in released.checkpoints().items() if e["url"].startswith(IMPROVED_URL)}


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_on_meta(entry):
    """The network and diffusion the entry's script builds from its flags, without memory."""
    script = load_script(entry["script"].removesuffix(".py"))
    args = script.create_argparser().parse_args(entry["flags"].split())
    if entry["kind"] == "sr":
        create, defaults = sr_create_model_and_diffusion, sr_model_and_diffusion_defaults()
    else:
        create, defaults = create_model_and_diffusion, model_and_diffusion_defaults()
    flags = args_to_dict(args, defaults.keys())
    flags.update({k: getattr(args, k) for k in ADDED_MODEL_FLAGS if hasattr(args, k)})
    with torch.device("meta"):
        model, diffusion = create(**flags)
    return model, diffusion, flags


def test_every_improved_diffusion_checkpoint_is_listed_with_its_address():
    entries = improved()
    assert list(entries) == README_ORDER
    for name, entry in entries.items():
        assert entry["file"] == f"{name}.pt" and entry["url"] == f"{IMPROVED_URL}{name}.pt"
        assert entry["layout"] in ORACLE["layouts"]
        assert entry["bytes"] is None and entry["sha256"] is None  # none published
        # The downloader takes them by name.
        assert released.resolve_names([name]) == [entry]


@pytest.mark.parametrize("name", README_ORDER)
def test_released_layout_loads_strictly_and_matches_their_code(name):
    entry = released.checkpoints()[name]
    oracle = ORACLE["layouts"][entry["layout"]]
    model, diffusion, flags = build_on_meta(entry)
    assert entry["kind"] == oracle["kind"]
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == oracle["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == oracle["num_params"] == entry["num_params"]
    # The schedule their code builds from their flags: 4000 steps where they trained 4000, and
    # their default rescale_timesteps=True where the README leaves it (this port's default is
    # False, so the flag must be in the table).
    assert len(diffusion.betas) == oracle["num_timesteps"]
    assert diffusion.rescale_timesteps == oracle["rescale_timesteps"]
    # A checkpoint of that layout loads with strict=True, through the scripts' own check.
    state = {k: torch.empty(shape, device="meta") for k, shape in oracle["state_dict"]}
    check_model_weights(model, state, entry["file"], flags=flags)
    model.load_state_dict(state, strict=True, assign=True)


def test_the_4000_step_trap_is_named_for_a_released_checkpoint():
    entry = released.checkpoints()["cifar10_uncond_50M_500K"]
    model, _, flags = build_on_meta(entry)
    known = hints.released_training_flags(f"/data/models/{entry['file']}", model)
    assert known is not None
    assert hints.explain_schedule_mismatch(flags, *known) is None  # the table's own flags
    # improved-diffusion#13: the README's 4000-step model sampled with the default 1000 steps.
    wrong = dict(flags, diffusion_steps=1000)
    message = hints.explain_schedule_mismatch(wrong, *known)
    assert "cifar10_uncond_50M_500K.pt (the released cifar10_uncond_50M_500K" in message
    assert "was trained with --diffusion_steps 4000 but the flags say --diffusion_steps 1000" in message
    assert "improved-diffusion#13" in message and message.endswith("pass --diffusion_steps 4000")
    # Their default rescale_timesteps=True, forgotten here: also named.
    message = hints.explain_schedule_mismatch(dict(flags, rescale_timesteps=False), *known)
    assert message.endswith("pass --rescale_timesteps True")
    # A network of another size under the same file name is not taken for the released one.
    other, _, _ = build_on_meta(dict(entry, flags=entry["flags"].replace("--num_res_blocks 3", "--num_res_blocks 2")))
    assert hints.released_training_flags(entry["file"], other) is None
    assert hints.released_training_flags("my_model.pt", model) is None


TOY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
       "--attention_resolutions", "4", "--num_head_channels", "16", "--learn_sigma", "True",
       "--noise_schedule", "cosine"]


def toy_checkpoint(folder, steps):
    args = load_script("image_train").create_argparser().parse_args([*TOY, "--diffusion_steps", steps])
    model, _ = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "ema_0.9999_000010.pt")
    argv = [*TOY, "--diffusion_steps", steps]
    write_run_record(str(folder), describe_run(vars(args), "image_train.py", argv))
    return folder / "ema_0.9999_000010.pt", sum(p.numel() for p in model.parameters())


def sample(argv):
    try:
        run_main(load_script("image_sample").main, [str(a) for a in argv])
    except SystemExit as exc:
        return exc.code
    return 0


def test_image_sample_refuses_other_steps_than_the_run_recorded(tmp_path, capsys):
    checkpoint, _ = toy_checkpoint(tmp_path / "run", "4000")
    out = tmp_path / "samples"
    base = ["--model_path", checkpoint, "--num_samples", 1, "--batch_size", 1,
            "--timestep_respacing", "2", "--log_dir", out, "--progress", "False"]
    assert sample([*base, "--diffusion_steps", 1000]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "(its run's" in err[0] and "args.json) was trained with --diffusion_steps 4000" in err[0]
    assert err[0].endswith("pass --diffusion_steps 4000")
    assert not out.exists()  # refused before the log folder was made
    # With the recorded flags (taken from args.json) it samples.
    assert sample([*base, "--log_dir", tmp_path / "s2"]) == 0


def test_image_sample_refuses_a_released_name_with_other_steps(tmp_path, capsys, monkeypatch):
    # A released entry for a toy network (the real ones are 50M+ parameters): same name and
    # parameter count, so the sampling script takes it for that checkpoint.
    checkpoint, count = toy_checkpoint(tmp_path / "plain", "4000")
    (tmp_path / "plain" / "args.json").unlink()
    named = tmp_path / "plain" / "toy_4000.pt"
    checkpoint.rename(named)
    entry = dict(name="toy_4000", file="toy_4000.pt", num_params=count,
                 flags=" ".join([*TOY, "--diffusion_steps", "4000"]))
    monkeypatch.setattr(released, "checkpoints", lambda: {"toy_4000": entry})
    assert sample(["--model_path", named, *TOY, "--num_samples", 1, "--batch_size", 1,
                   "--timestep_respacing", "2", "--log_dir", tmp_path / "o"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "toy_4000.pt (the released toy_4000, docs/reproduce.md) was trained with " \
           "--diffusion_steps 4000 but the flags say --diffusion_steps 1000" in line
