"""
Export to Hugging Face diffusers (guided_diffusion/interop/diffusers_export.py,
scripts/export_diffusers.py), checked against diffusers itself: the exported UNet2DModel /
DiTTransformer2DModel, run by diffusers' own code, must give our network's outputs with every
weight perturbed (zero-initialised output layers would make equality trivial), and the exported
DDPMScheduler must compute our alphas_cumprod. Tiny float32 models on the CPU.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from guided_diffusion.dit import DiT  # noqa: E402
from guided_diffusion.errors import ScriptError  # noqa: E402
from guided_diffusion.interop import diffusers_export as dx  # noqa: E402
from guided_diffusion.runtime.run_record import describe_run, write_run_record  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_classifier,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "export_diffusers.py")
RELEASED = os.path.join(REPO, "guided_diffusion", "data", "released.json")
# The channel tables the factories use for the released sizes (script_util).
CHANNEL_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4),
                512: (0.5, 1, 1, 2, 2, 4, 4)}


def _perturb(model, seed=0):
    """Every parameter drawn from N(0, 0.2^2): no zero layer hides a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _unet(**kw):
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="16,8", num_head_channels=32, num_classes=5)
    flags.update(kw)
    return create_model(**flags)


def _agree(model, diffusers_model, size=16, channels=3, classes=True, batch=3):
    model.eval()  # dropout off (the 64x64 and LSUN layouts have 0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.tensor([0, 457, 999][:batch])
    y = torch.tensor([0, 4, 2][:batch]) if classes else None
    with torch.no_grad():
        ours = model(x, t, y=y)
        theirs = diffusers_model(x, t, class_labels=y).sample
    assert theirs.shape == ours.shape
    assert ours.abs().mean() > 0.01  # a real output, not the zero of a fresh model
    return _rel(theirs, ours)


@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize("updown", [True, False])
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("class_cond", [True, False])
def test_unet_outputs_equal_diffusers(scale_shift, updown, learn_sigma, class_cond):
    model = _perturb(_unet(use_scale_shift_norm=scale_shift, resblock_updown=updown,
                           learn_sigma=learn_sigma, class_cond=class_cond))
    exported, name = dx.to_diffusers(model)
    assert name == "unet" and isinstance(exported, diffusers.UNet2DModel)
    assert exported.config.out_channels == (6 if learn_sigma else 3)
    expected = "scale_shift" if scale_shift else "default"
    assert exported.config.resnet_time_scale_shift == expected
    assert _rel_ok(_agree(model, exported, classes=class_cond))
    # One parameter for one parameter: the same network, not a bigger one that happens to agree.
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in model.parameters())


def _rel_ok(rel):
    assert rel < 1e-4, rel
    return True


@pytest.mark.parametrize("heads", [
    dict(num_head_channels=16),  # several heads per block, legacy [q k v per head] layout
    dict(num_head_channels=16, use_new_attention_order=True),
    dict(num_heads=1, num_head_channels=-1),  # one head everywhere: attention_head_dim None
    # A fixed head count maps when every attention block has one width (here only 8x8 and the
    # middle, both 64 channels).
    dict(num_heads=4, num_head_channels=-1, attention_resolutions="8"),
])
def test_attention_layouts_equal_diffusers(heads):
    model = _perturb(_unet(class_cond=True, **heads))
    exported, _ = dx.to_diffusers(model)
    assert _rel_ok(_agree(model, exported))


def _released_layouts():
    """guided-diffusion's released checkpoints (improved-diffusion's are not yet covered by the
    export tests: see docs/interop.md)."""
    with open(RELEASED) as f:
        table = json.load(f)["checkpoints"]
    return {row["name"]: row for row in table if "/diffusion/jul-2021/" in row["url"]}


def _shrunk_flags(row):
    """A released checkpoint's flags with its levels, blocks, attention levels, head layout and
    options kept, at 32 base channels, 32-channel heads and the smallest image."""
    words = row["flags"].split()
    flags = dict(model_and_diffusion_defaults())
    for key, value in zip(words[::2], words[1::2]):
        key = key.lstrip("-")
        default = flags.get(key, value)
        flags[key] = (value == "True") if isinstance(default, bool) else type(default)(value)
    size = flags["image_size"]
    mult = CHANNEL_MULT[size]
    small = 2 ** (len(mult) - 1) * 2
    ds = [size // int(r) for r in flags["attention_resolutions"].split(",")]
    flags.update(
        image_size=small, num_channels=32, channel_mult=",".join(map(str, mult)),
        attention_resolutions=",".join(str(small // d) for d in ds if small // d >= 1),
        use_fp16=False, num_classes=7,
    )
    if flags["num_head_channels"] != -1:
        flags["num_head_channels"] = 32
    return flags


EXPRESSIBLE = ["64x64_diffusion", "256x256_diffusion", "256x256_diffusion_uncond", "lsun_bedroom"]


@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_released_layouts_equal_diffusers(name):
    flags = _shrunk_flags(_released_layouts()[name])
    model, diffusion = create_model_and_diffusion(**flags)
    _perturb(model)
    exported, _ = dx.to_diffusers(model)
    assert len(exported.down_blocks) == len(flags["channel_mult"].split(","))
    assert _rel_ok(_agree(model, exported, size=flags["image_size"],
                          classes=flags["class_cond"], batch=2))
    config = dx.scheduler_config(diffusion)
    assert config["variance_type"] == "learned_range" and config["prediction_type"] == "epsilon"


@pytest.mark.parametrize("name, words", [
    # 4 heads over 512-, 768- and 1024-channel blocks: heads of three widths.
    ("128x128_diffusion", "one attention_head_dim"),
    # channel_mult starts with 0.5: our timestep features are 256 wide, diffusers' 128.
    ("512x512_diffusion", "must start with 1"),
])
def test_released_layouts_diffusers_cannot_express_are_refused(name, words):
    flags = _shrunk_flags(_released_layouts()[name])
    # 4 heads need widths divisible by 4 at every level; 0.5 x base must hold 32 groups.
    flags["num_channels"] = 64
    model, _ = create_model_and_diffusion(**flags)
    with pytest.raises(ScriptError, match=words) as err:
        dx.to_diffusers(model)
    assert str(err.value).startswith("cannot export to diffusers:") and "\n" not in str(err.value)


def test_every_released_diffusion_layout_is_tested_or_refused():
    kinds = {n: r["kind"] for n, r in _released_layouts().items()}
    layouts = {r["layout"] for r in _released_layouts().values() if r["kind"] == "unet"}
    assert layouts == set(EXPRESSIBLE) | {"128x128_diffusion", "512x512_diffusion"}
    assert {n for n, k in kinds.items() if k == "sr"} == {"64_256_upsampler", "128_512_upsampler"}


def test_classifier_and_super_resolution_are_refused():
    classifier = create_classifier(
        image_size=16, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="8", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention", num_classes=5,
        classifier_channel_mult="1,2")
    with pytest.raises(ScriptError, match="noisy-image classifier"):
        dx.to_diffusers(classifier)
    sr = sr_create_model(
        large_size=16, small_size=8, num_channels=32, num_res_blocks=1, learn_sigma=True,
        class_cond=False, use_checkpoint=False, attention_resolutions="8", num_heads=1,
        num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
        resblock_updown=True, use_fp16=False, channel_mult="1,2")
    with pytest.raises(ScriptError, match="super-resolution"):
        dx.to_diffusers(sr)


def test_num_heads_upsample_that_changes_the_head_width_is_refused():
    model = _unet(num_heads=2, num_head_channels=-1, num_heads_upsample=1,
                  attention_resolutions="8")
    with pytest.raises(ScriptError, match="different widths"):
        dx.to_diffusers(model)


# ------------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["learn_sigma", "sigma_small", "large"])
def test_scheduler_matches_our_diffusion(schedule, variance, tmp_path):
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule=schedule, learn_sigma=variance == "learn_sigma",
        sigma_small=variance == "sigma_small")
    diffusers.DDPMScheduler(**dx.scheduler_config(diffusion)).save_pretrained(tmp_path)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    ours = torch.from_numpy(diffusion.alphas_cumprod)
    assert (scheduler.alphas_cumprod.double() - ours).abs().max() < 1e-6
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.variance_type == {"learn_sigma": "learned_range",
                                              "sigma_small": "fixed_small",
                                              "large": "fixed_large"}[variance]
    # An independent oracle for the cosine case: diffusers' own squaredcos_cap_v2 schedule is
    # Nichol & Dhariwal 2021's eq. 17 with the same 0.999 cap.
    if schedule == "cosine":
        named = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                        beta_schedule="squaredcos_cap_v2")
        assert (named.alphas_cumprod.double() - ours).abs().max() < 1e-6


def test_scheduler_refusals_and_x0_models():
    from guided_diffusion.script_util import create_gaussian_diffusion

    x0 = create_gaussian_diffusion(steps=100, predict_xstart=True)
    assert dx.scheduler_config(x0)["prediction_type"] == "sample"
    with pytest.raises(ScriptError, match="respaced"):
        dx.scheduler_config(create_gaussian_diffusion(steps=100, timestep_respacing="10"))
    with pytest.raises(ScriptError, match="rescale_timesteps"):
        dx.scheduler_config(create_gaussian_diffusion(steps=100, rescale_timesteps=True))


# ------------------------------------------------------------------------------------- DiT


def _dit(num_classes=10, class_dropout_prob=0.1, **kw):
    config = dict(image_size=16, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                  patch_size=2, num_classes=num_classes, class_dropout_prob=class_dropout_prob,
                  learn_sigma=True)
    config.update(kw)
    return _perturb(DiT(**config))


@pytest.mark.parametrize("class_dropout_prob", [0.1, 0.0])
def test_dit_outputs_equal_diffusers(class_dropout_prob, tmp_path):
    model = _dit(class_dropout_prob=class_dropout_prob)
    _, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(),
                                                 "learn_sigma": True})
    dx.export_diffusers(model, diffusion, tmp_path / "out")
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "out",
                                                                  subfolder="transformer")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=gen)
    t, y = torch.tensor([0, 457, 999]), torch.tensor([0, 9, 3])
    with torch.no_grad():
        ours = model(x, t, y=y)
        plain = transformer(x, t, class_labels=y).sample
        dx.use_dit_timestep_frequencies(transformer)
        theirs = transformer(x, t, class_labels=y).sample
    # The learned-sigma channels come out as ours: noise first, then the variance values.
    assert theirs.shape == ours.shape == (3, 8, 16, 16)
    assert _rel_ok(_rel(theirs, ours))
    # diffusers' DiT timestep frequencies (downscale_freq_shift=1) are not DiT's: without the
    # fix the function differs, which is why use_dit_timestep_frequencies exists.
    assert _rel(plain, ours) > 1e-3


def test_unconditional_and_rectangular_dit_are_refused():
    with pytest.raises(ScriptError, match="always adds a class embedding"):
        dx.to_diffusers(_dit(num_classes=None, class_dropout_prob=0.0))
    with pytest.raises(ScriptError, match="square"):
        dx.to_diffusers(_dit(image_size=(16, 8)))


# ------------------------------------------------------------------------ files and script


def _export_script(argv):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import export_diffusers
    finally:
        sys.path.pop(0)
    return export_diffusers.main(argv)


SMALL = ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
         "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_head_channels", "16",
         "--learn_sigma", "True", "--class_cond", "True", "--num_classes", "5"]


def _small_checkpoint(folder, with_record=False):
    flags = dict(model_and_diffusion_defaults())
    flags.update(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="8", num_head_channels=16, learn_sigma=True,
                 class_cond=True, num_classes=5, noise_schedule="cosine")
    model, diffusion = create_model_and_diffusion(**flags)
    _perturb(model)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model000010.pt")
    torch.save(model.state_dict(), path)
    if with_record:
        write_run_record(folder, describe_run(flags, "image_train.py", argv=[]))
    return path, model, diffusion


def _files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def test_script_exports_from_args_json_loadable_equal_and_reproducible(tmp_path):
    path, model, diffusion = _small_checkpoint(tmp_path / "run", with_record=True)
    # No model flags: they come from the args.json beside the checkpoint (cosine schedule too).
    _export_script(["--model_path", path, "--out_dir", str(tmp_path / "a")])
    _export_script(["--model_path", path, "--out_dir", str(tmp_path / "b")])
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b")  # exported twice: byte-identical files
    assert set(first) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                          "scheduler/scheduler_config.json"}
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "a", subfolder="unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "a", subfolder="scheduler")
    assert _rel_ok(_agree(model, unet.eval()))
    ours = torch.from_numpy(diffusion.alphas_cumprod)
    assert (scheduler.alphas_cumprod.double() - ours).abs().max() < 1e-6
    assert scheduler.config.variance_type == "learned_range"


def test_unconditional_export_is_a_ddpm_pipeline(tmp_path):
    flags = dict(model_and_diffusion_defaults())
    flags.update(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="8", num_head_channels=16, learn_sigma=False)
    model, diffusion = create_model_and_diffusion(**flags)
    files = dx.export_diffusers(model, diffusion, tmp_path / "p")
    assert "model_index.json" in files
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "p")
    assert isinstance(pipe.unet, diffusers.UNet2DModel)
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_out_dir_refusals(tmp_path):
    path, model, diffusion = _small_checkpoint(tmp_path / "run")
    argv = ["--model_path", path, *SMALL]
    with pytest.raises(ScriptError, match="--out_dir DIR"):
        _export_script(argv)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ScriptError, match="not a diffusers export"):
        _export_script(argv + ["--out_dir", str(tmp_path / "mine"), "--overwrite", "True"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ScriptError, match="is a file"):
        _export_script(argv + ["--out_dir", str(tmp_path / "afile")])
    out = tmp_path / "e"
    _export_script(argv + ["--out_dir", str(out)])
    before = _files(out)
    with pytest.raises(ScriptError, match="--overwrite True"):
        _export_script(argv + ["--out_dir", str(out)])
    # --overwrite replaces it (here with another model's weights).
    _perturb(model, seed=5)
    torch.save(model.state_dict(), path)
    _export_script(argv + ["--out_dir", str(out), "--overwrite", "True"])
    after = _files(out)
    assert set(after) == set(before) and after != before
    assert not [e for e in os.listdir(tmp_path) if ".export-" in e]  # no temporaries left


@pytest.mark.parametrize("case", ["missing", "empty", "not_a_checkpoint", "wrong_flags"])
def test_model_path_bad_input(case, tmp_path):
    argv = ["--out_dir", str(tmp_path / "out"), *SMALL]
    if case == "missing":
        argv += ["--model_path", str(tmp_path / "nope.pt")]
        error = FileNotFoundError
    elif case == "empty":
        error = ScriptError
    elif case == "not_a_checkpoint":
        from PIL import Image

        Image.new("RGB", (4, 4)).save(tmp_path / "image.png")  # the wrong kind of file
        argv += ["--model_path", str(tmp_path / "image.png")]
        error = ValueError
    else:
        path, _, _ = _small_checkpoint(tmp_path / "run")
        argv += ["--model_path", path, "--num_channels", "64"]
        error = ScriptError
    with pytest.raises(error):
        _export_script(argv)
    assert not (tmp_path / "out").exists()


def test_script_refusal_is_one_line_exit_2(tmp_path):
    """Through the real entry point: a model diffusers cannot express, one line, status 2."""
    path = tmp_path / "m.pt"
    model = _unet(num_heads=2, num_head_channels=-1, num_heads_upsample=1,
                  attention_resolutions="8", class_cond=True, learn_sigma=True)
    torch.save(model.state_dict(), path)
    flags = ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
             "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_heads", "2",
             "--num_heads_upsample", "1", "--learn_sigma", "True", "--class_cond", "True",
             "--num_classes", "5", "--use_scale_shift_norm", "False"]
    proc = subprocess.run([sys.executable, SCRIPT, "--model_path", str(path), "--out_dir",
                           str(tmp_path / "out"), *flags], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot export to diffusers:"), lines
    assert not (tmp_path / "out").exists()


def test_help_lists_what_is_exported():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    text = " ".join(proc.stdout.split())
    for words in ("OUT/unet", "UNet2DModel", "OUT/transformer", "DiTTransformer2DModel",
                  "OUT/scheduler", "DDPMScheduler", "safetensors", "--overwrite"):
        assert words in text, words


def test_script_exports_a_dit_checkpoint(tmp_path):
    """A DiT checkpoint (its keys say so) exported by the script: shapes from the state dict,
    the head count from the named size (DiT-S/8 here, at 16 pixels)."""
    model = _dit(image_size=16, hidden_size=384, depth=12, num_heads=6, patch_size=8,
                 num_classes=5, in_channels=4)
    path = tmp_path / "dit.pt"
    torch.save(model.state_dict(), path)
    _export_script(["--model_path", str(path), "--out_dir", str(tmp_path / "d"),
                    "--learn_sigma", "True", "--num_classes", "5"])
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "d",
                                                                  subfolder="transformer")
    dx.use_dit_timestep_frequencies(transformer)
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([3, 800]), torch.tensor([4, 5])  # 5: the null class
    with torch.no_grad():
        assert _rel_ok(_rel(transformer(x, t, class_labels=y).sample, model(x, t, y=y)))
    with pytest.raises(ScriptError, match="--num_classes"):
        _export_script(["--model_path", str(path), "--out_dir", str(tmp_path / "e"),
                        "--learn_sigma", "True", "--num_classes", "9"])


# ----------------------------------------------------------------------------- interruption


def test_interrupted_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    model = _perturb(_unet(class_cond=True))
    _, diffusion = create_model_and_diffusion(**model_and_diffusion_defaults())
    out = tmp_path / "out"
    dx.export_diffusers(model, diffusion, out)
    before = _files(out)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffusers.DDPMScheduler, "save_pretrained", interrupted)
    _perturb(model, seed=3)
    with pytest.raises(KeyboardInterrupt):
        dx.export_diffusers(model, diffusion, out, overwrite=True)
    assert _files(out) == before
    with pytest.raises(KeyboardInterrupt):
        dx.export_diffusers(model, diffusion, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert not [e for e in os.listdir(tmp_path) if ".export-" in e]


_KILLED = """
import os, signal, sys, torch, diffusers
sys.path.insert(0, {repo!r})
from guided_diffusion.interop import diffusers_export as dx
from guided_diffusion.script_util import create_model, create_model_and_diffusion, model_and_diffusion_defaults
model = create_model(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                     attention_resolutions="8", num_head_channels=32)
_, diffusion = create_model_and_diffusion(**model_and_diffusion_defaults())
where = {where!r}
if where == "writing":
    diffusers.DDPMScheduler.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
else:  # between moving the earlier export aside and renaming the new one in
    real = os.rename
    def rename(src, dst):
        real(src, dst)
        if dst.endswith("export"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
dx.export_diffusers(model, diffusion, {out!r}, overwrite=True)
"""


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_killed_export_is_cleaned_up_by_the_next(where, tmp_path):
    """SIGKILL mid-export: out_dir keeps the earlier export (or gets it back), and the next
    export clears the killed one's temporary folder."""
    model = _perturb(_unet(class_cond=False))
    _, diffusion = create_model_and_diffusion(**model_and_diffusion_defaults())
    out = tmp_path / "out"
    dx.export_diffusers(model, diffusion, out)
    before = _files(out)
    code = _KILLED.format(repo=REPO, where=where, out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [e for e in os.listdir(tmp_path) if ".export-" in e]  # the killed one's leftovers
    if where == "writing":
        assert _files(out) == before
    # The next export (any process) puts things right first.
    dx._remove_stale_temporaries(str(tmp_path), "out")
    assert _files(out) == before
    assert not [e for e in os.listdir(tmp_path) if ".export-" in e]
    dx.export_diffusers(model, diffusion, out, overwrite=True)
    assert _files(out) == before


# ------------------------------------------------------------ the reverse: diffusers -> ours


def test_diffusers_folder_samples_as_the_checkpoint_it_came_from(tmp_path):
    """image_sample.py --model_path EXPORT_FOLDER: the model flags come from the folder's
    configs, the weights from its safetensors, and the samples equal those of the original
    checkpoint with the same seed."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import image_sample
    finally:
        sys.path.pop(0)
    path, model, diffusion = _small_checkpoint(tmp_path / "run", with_record=True)
    dx.export_diffusers(model, diffusion, tmp_path / "export")
    common = ["--num_samples", "2", "--batch_size", "2", "--timestep_respacing", "4",
              "--seed", "3", "--progress", "False"]
    image_sample.main(["--model_path", path, "--out_dir", str(tmp_path / "a"),
                       "--log_dir", str(tmp_path / "la"), *common])
    # No model flags at all: the folder says them (here a cosine schedule, 5 classes).
    image_sample.main(["--model_path", str(tmp_path / "export"), "--out_dir",
                       str(tmp_path / "b"), "--log_dir", str(tmp_path / "lb"), *common])
    import numpy as np

    (a,) = [f for f in os.listdir(tmp_path / "a") if f.endswith(".npz")]
    (b,) = [f for f in os.listdir(tmp_path / "b") if f.endswith(".npz")]
    with np.load(tmp_path / "a" / a) as x, np.load(tmp_path / "b" / b) as y:
        assert (x["arr_0"] == y["arr_0"]).all() and (x["arr_1"] == y["arr_1"]).all()


def test_diffusers_folder_round_trip_and_refusals(tmp_path):
    model = _perturb(_unet(class_cond=True, learn_sigma=True, use_scale_shift_norm=True,
                           resblock_updown=True, num_head_channels=16))
    _, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(),
                                                 "learn_sigma": True})
    dx.export_diffusers(model, diffusion, tmp_path / "e")
    flags = dx.flags_from_diffusers(tmp_path / "e")
    assert flags["num_head_channels"] == 16 and flags["resblock_updown"] is True
    assert flags["noise_schedule"] == "linear" and flags["learn_sigma"] is True
    back, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **flags})
    dx.load_diffusers_weights(back, tmp_path / "e")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.tensor([1, 4])
    with torch.no_grad():
        assert _rel_ok(_rel(back.eval()(x, t, y=y), model.eval()(x, t, y=y)))
    # A UNet2DModel that is not one of ours: refused in one line naming the setting.
    config_path = tmp_path / "e" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "freq_shift": 1}))
    with pytest.raises(ScriptError, match="freq_shift"):
        dx.flags_from_diffusers(tmp_path / "e")
    config_path.write_text(json.dumps({**config, "down_block_types": ["CrossAttnDownBlock2D",
                                                                      "DownBlock2D"]}))
    with pytest.raises(ScriptError, match="not one of our UNet's layouts"):
        dx.flags_from_diffusers(tmp_path / "e")
