"""
DiT through every path of the package (issue 32): the network interface both families
implement, --arch / --dit_model in the one factory switch, training with the engine (resume,
args.json, sample grids, fine-tune init, bfloat16), sampling with every sampler with
classifier-free and classifier guidance, --guidance_channels against a hand computation of DiT's
convention, --vae_path with a random-weight AutoencoderKL, and the one-line refusals.
"""

import json

import numpy as np
import pytest
import torch

from guided_diffusion.data.digits import write_digits
from guided_diffusion.diffusion.guidance import classifier_free_guidance
from guided_diffusion.dit import DiT
from guided_diffusion.networks import (
    ARCHITECTURES,
    DenoisingNetwork,
    architecture_of,
    label_embedding_of,
    set_precision,
)
from guided_diffusion.sampling import latents as latent_sampling
from guided_diffusion.sampling.loop import SAMPLER_NAMES
from guided_diffusion.script_util import (
    create_classifier,
    create_model,
    create_model_and_diffusion,
    explain_state_dict_mismatch,
    model_and_diffusion_defaults,
    sr_create_model,
)
from guided_diffusion.unet import SuperResModel, UNetModel

from test_scripts import error_line, run_inprocess

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

CLASSES = 4
DIT = "depth=2,width=32,heads=2,patch=2"
TINY = ["--arch", "dit", "--dit_model", DIT, "--image_size", 8, "--diffusion_steps", 50,
        "--learn_sigma", True, "--noise_schedule", "cosine", "--class_cond", True,
        "--num_classes", CLASSES, "--class_dropout_prob", 0.2]


# ----------------------------------------------------------------------------- the interface


def test_the_issue_call_builds_the_papers_dit_s2():
    model, diffusion = create_model_and_diffusion(**{
        **model_and_diffusion_defaults(), "arch": "dit", "dit_model": "DiT-S/2", "image_size": 32,
        "in_channels": 4, "learn_sigma": True, "class_cond": True, "num_classes": 1000,
        "class_dropout_prob": 0.1})
    assert isinstance(model, DiT)
    # The paper's Table 1: DiT-S has 12 blocks of width 384 with 6 heads; /2 is the patch.
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (12, 384, 6, 2)
    assert model.out_channels == 8  # learned variances: twice the 4 latent channels
    assert model.y_embedder.embedding_table.num_embeddings == 1001  # the null-class row
    assert diffusion.num_timesteps == 1000
    # The default is still the reference's UNet, from the reference's flags alone.
    unet, _ = create_model_and_diffusion(**model_and_diffusion_defaults())
    assert type(unet) is UNetModel


def test_every_family_implements_the_interface():
    assert ARCHITECTURES == {"unet": UNetModel, "dit": DiT}
    assert issubclass(SuperResModel, DenoisingNetwork)
    for model in (create_model(8, 32, 1, channel_mult="1,2", class_cond=True, num_classes=3,
                               attention_resolutions="4"),
                  create_model(8, 16, 1, arch="dit", dit_model=DIT, class_cond=True,
                               num_classes=3)):
        assert isinstance(model, DenoisingNetwork)
        table = label_embedding_of(model)
        assert table.num_embeddings == 3
        assert model.state_dict()[model.label_key].shape == table.weight.shape
        assert architecture_of(model.state_dict()) == model.arch
        set_precision(model, "bf16")
        assert model.dtype == torch.bfloat16
        set_precision(model, "fp32")
        assert model.dtype == torch.float32
    # The classifier is the UNet's way down only: no family claims it.
    classifier = create_classifier(8, False, 32, 1, "4", True, True, "attention",
                                   num_classes=3, classifier_channel_mult="1,2")
    assert architecture_of(classifier.state_dict()) is None


def test_dit_layout_is_read_off_the_shapes():
    model = create_model(32, 16, 1, arch="dit", dit_model="DiT-S/4", in_channels=4,
                         learn_sigma=True, class_cond=True, num_classes=7)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert DiT.layout_flags(shapes) == {"arch": "dit", "dit_model": "DiT-S/4", "in_channels": 4,
                                        "learn_sigma": True, "image_size": 32,
                                        "class_cond": True}


def test_guidance_channels_first3_is_dits_convention_by_hand():
    """DiT's sample.py: eps = out[:, :3], rest = out[:, 3:]; the first three guided, the rest
    (latent channel 3 and the variance values) from the conditional half."""
    torch.manual_seed(0)
    weight = torch.randn(8, 4)

    def model(x, t, y=None):
        # Any function of (x, t, y) with 8 output channels; the labels shift every channel.
        out = torch.einsum("oc,nchw->nohw", weight, x) + t.view(-1, 1, 1, 1) * 0.01
        return out + y.float().view(-1, 1, 1, 1)

    x, t, y, null, w = torch.randn(2, 4, 3, 3), torch.tensor([5.0, 7.0]), torch.tensor([1, 2]), 9, 4.0
    guided = classifier_free_guidance(model, w, null_label=null, channels=3)(x, t, y=y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null))
    by_hand = cond.clone()
    for c in range(3):
        by_hand[:, c] = uncond[:, c] + w * (cond[:, c] - uncond[:, c])
    torch.testing.assert_close(guided, by_hand, rtol=0, atol=1e-5)
    every = classifier_free_guidance(model, w, null_label=null)(x, t, y=y)
    torch.testing.assert_close(every[:, 3], uncond[:, 3] + w * (cond[:, 3] - uncond[:, 3]))
    torch.testing.assert_close(every[:, 4:], cond[:, 4:])


# ----------------------------------------------------------------------------- mismatch hints


def _state(**flags):
    return create_model(8, 32, 1, channel_mult="1,2", attention_resolutions="4", **flags).state_dict()


def test_a_checkpoint_of_the_other_family_is_named():
    unet = create_model(8, 32, 1, channel_mult="1,2", attention_resolutions="4")
    dit_state = _state(arch="dit", dit_model="DiT-S/8", class_cond=True, num_classes=5)
    line = explain_state_dict_mismatch(unet, dit_state, flags={"image_size": 8})
    assert line.startswith("this file holds a DiT (--arch dit), not a UNet")
    assert "--arch dit --dit_model DiT-S/8" in line and "--class_cond True" in line
    dit = create_model(8, 16, 1, arch="dit", dit_model=DIT)
    line = explain_state_dict_mismatch(dit, unet.state_dict())
    assert line.startswith("this file holds a UNet (--arch unet), not a DiT") and "--arch unet" in line


def test_a_dit_of_another_size_or_labels_is_named_by_its_flags():
    flags = dict(model_and_diffusion_defaults(), image_size=8, arch="dit", dit_model=DIT,
                 class_cond=True, num_classes=CLASSES, class_dropout_prob=0.0)

    def build(f):
        return create_model_and_diffusion(**f)[0]

    model = build(flags)
    bigger = build({**flags, "dit_model": "depth=3,width=32,heads=2,patch=2"}).state_dict()
    line = explain_state_dict_mismatch(model, bigger, flags, build)
    assert line.startswith("pass --dit_model depth=3,width=32,heads=2,patch=2")
    with_null = build({**flags, "class_dropout_prob": 0.1}).state_dict()
    line = explain_state_dict_mismatch(model, with_null, flags, build)
    assert "one more than --num_classes 4" in line and "--class_dropout_prob 0.1" in line


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DiT trained 2 steps on four digit classes, with a sample grid at step 2."""
    import os

    root = tmp_path_factory.mktemp("dit")
    data = write_digits(str(root / "digits"), image_size=8, limit=40)
    for name in os.listdir(data):
        if int(name.split("_")[0]) >= CLASSES:
            os.remove(os.path.join(data, name))
    log = root / "train"
    common = ["--data_dir", data, *TINY, "--batch_size", 4, "--log_interval", 1, "--lr", 1e-3]
    assert run_inprocess("image_train", [*common, "--log_dir", log, "--max_steps", 2,
                                         "--save_interval", 2, "--sample_interval", 2,
                                         "--sample_steps", 3]) == 0
    return {"root": root, "data": data, "log": log, "common": common}


def test_training_records_the_arch_draws_a_grid_and_resumes(trained):
    log = trained["log"]
    recorded = json.loads((log / "args.json").read_text())
    assert recorded["flags"]["arch"] == "dit" and recorded["flags"]["dit_model"] == DIT
    assert (log / "samples_step000002.png").is_file()  # the --sample_interval grid
    state = torch.load(log / "model000002.pt", weights_only=True)
    assert state["y_embedder.embedding_table.weight"].shape[0] == CLASSES + 1
    assert run_inprocess("image_train", [*trained["common"], "--log_dir", log,
                                         "--resume_checkpoint", log / "model000002.pt",
                                         "--max_steps", 1, "--save_interval", 1]) == 0
    resumed = torch.load(log / "model000003.pt", weights_only=True)
    assert set(resumed) == set(state)
    assert any(not torch.equal(resumed[k], state[k]) for k in state)  # it trained on


def test_fine_tuning_a_dit_reinitialises_its_label_table(trained, tmp_path):
    init = trained["log"] / "model000002.pt"
    common = [a for a in trained["common"]]
    common[common.index("--num_classes") + 1] = 3
    assert run_inprocess("image_train", [*common, "--init_checkpoint", init,
                                         "--init_num_classes", 3, "--max_steps", 1, "--lr", 0,
                                         "--save_interval", 1, "--log_dir", tmp_path,
                                         "--data_dir", _three_classes(trained, tmp_path)]) == 0
    before = torch.load(init, weights_only=True)
    after = torch.load(tmp_path / "model000001.pt", weights_only=True)
    key = "y_embedder.embedding_table.weight"
    assert after[key].shape[0] == 4  # 3 classes and the null class
    for k in before:
        if k != key:  # --lr 0: every other tensor is the checkpoint's
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


def _three_classes(trained, tmp_path):
    import os
    import shutil

    folder = tmp_path / "three"
    folder.mkdir()
    for name in os.listdir(trained["data"]):
        if int(name.split("_")[0]) < 3:
            shutil.copy(os.path.join(trained["data"], name), folder / name)
    return folder


def test_bf16_training_step(trained, tmp_path):
    assert run_inprocess("image_train", [*trained["common"], "--use_bf16", True,
                                         "--max_steps", 1, "--save_interval", 1,
                                         "--log_dir", tmp_path]) == 0
    state = torch.load(tmp_path / "model000001.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())  # float32 masters saved


# ----------------------------------------------------------------------------- sampling


def sample(trained, out, *extra, num=2, script="image_sample"):
    args = ["--model_path", trained["log"] / "model000002.pt", "--num_samples", num,
            "--batch_size", num, "--seed", 3, "--log_dir", out, "--progress", "False", *extra]
    return run_inprocess(script, args)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_with_classifier_free_guidance(trained, tmp_path, sampler):
    budget = (["--timestep_respacing", 5] if sampler in ("ddpm", "ddim")
              else ["--evaluations", 4 if sampler != "heun" else 5])
    # The run's args.json beside the checkpoint gives the DiT flags.
    assert sample(trained, tmp_path, "--sampler", sampler, *budget, "--guidance_scale", 3.0) == 0
    with np.load(tmp_path / "samples_2x8x8x3.npz") as npz:
        assert npz["arr_0"].shape == (2, 8, 8, 3) and npz["arr_1"].shape == (2,)


def test_classifier_guidance_steers_a_dit(trained, tmp_path):
    torch.manual_seed(1)
    classifier = create_classifier(8, False, 32, 1, "4", True, True, "attention",
                                   num_classes=CLASSES, classifier_channel_mult="1,2")
    torch.nn.init.normal_(classifier.out[-1].c_proj.weight, std=1.0)
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    flags = ["--classifier_width", 32, "--classifier_depth", 1, "--classifier_channel_mult", "1,2",
             "--classifier_attention_resolutions", 4, "--classifier_path",
             tmp_path / "classifier.pt", "--timestep_respacing", "ddim5", "--use_ddim", True,
             "--guidance_scale", 2.0, "--guidance_channels", "first3", "--overwrite", True]
    outputs = []
    for scale in (0.0, 50.0):
        assert sample(trained, tmp_path, *flags, "--classifier_scale", scale,
                      script="classifier_sample") == 0
        with np.load(tmp_path / "samples_2x8x8x3.npz") as npz:
            outputs.append(npz["arr_0"])
    assert not np.array_equal(*outputs)


# ----------------------------------------------------------------------------- --vae_path


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    # Two levels: the decoder doubles the side once; a scaling factor that is not DiT's, so a
    # decoder that ignored the config would be seen.
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder, vae.eval()


def test_the_decoder_divides_by_the_configs_scaling_factor(tiny_vae):
    folder, vae = tiny_vae

    class Args:
        vae_path, in_channels = str(folder), 4

    decoder = latent_sampling.latent_decoder(Args)
    assert decoder.scaling_factor == 0.5 and decoder.image_size(4) == 8 and decoder.channels == 3
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z * 2.0).sample  # 1 / 0.5
    torch.testing.assert_close(decoder(z), expected)


@pytest.fixture(scope="module")
def latent_dit(tmp_path_factory):
    """A random 4-channel DiT at 4x4 latents (its output layer given weights: theirs start at 0)."""
    folder = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    model = create_model(4, 16, 1, arch="dit", dit_model=DIT, in_channels=4, learn_sigma=True,
                         class_cond=True, num_classes=CLASSES, class_dropout_prob=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    torch.save(model.state_dict(), folder / "dit.pt")
    flags = ["--arch", "dit", "--dit_model", DIT, "--image_size", 4, "--in_channels", 4,
             "--learn_sigma", True, "--class_cond", True, "--num_classes", CLASSES,
             "--class_dropout_prob", 0.1, "--diffusion_steps", 50,
             "--model_path", folder / "dit.pt", "--num_samples", 2, "--batch_size", 2,
             "--seed", 0, "--progress", "False", "--timestep_respacing", "ddim4",
             "--use_ddim", True, "--guidance_scale", 4.0]
    return flags


def test_vae_path_decodes_and_without_it_latents_are_written(latent_dit, tiny_vae, tmp_path):
    folder, _ = tiny_vae
    assert run_inprocess("image_sample", [*latent_dit, "--log_dir", tmp_path / "raw"]) == 0
    with np.load(tmp_path / "raw" / "samples_2x4x4x4.npz") as npz:
        assert npz["arr_0"].shape == (2, 4, 4, 4)
    assert run_inprocess("image_sample", [*latent_dit, "--vae_path", folder,
                                          "--log_dir", tmp_path / "decoded"]) == 0
    with np.load(tmp_path / "decoded" / "samples_2x8x8x3.npz") as npz:
        assert npz["arr_0"].shape == (2, 8, 8, 3) and npz["arr_1"].shape == (2,)


# ----------------------------------------------------------------------------- bad input


def test_factory_refusals():
    with pytest.raises(ValueError, match="unknown --arch 'vit': use unet or dit"):
        create_model(8, 16, 1, arch="vit")
    with pytest.raises(ValueError, match="unknown --dit_model 'DiT-M/2'"):
        create_model(8, 16, 1, arch="dit", dit_model="DiT-M/2")
    with pytest.raises(ValueError, match="unknown --dit_model 'depth=2'"):
        create_model(8, 16, 1, arch="dit", dit_model="depth=2")
    with pytest.raises(ValueError, match="divisible by it, got 9x9: change --image_size or "
                                         "pick another --dit_model"):
        create_model(9, 16, 1, arch="dit", dit_model=DIT)
    with pytest.raises(ValueError, match="pass --dropout 0 with --arch dit"):
        create_model(8, 16, 1, arch="dit", dit_model=DIT, dropout=0.1)
    with pytest.raises(ValueError, match="the super-resolution model is a UNet; pass --arch unet"):
        sr_create_model(8, 4, 32, 1, False, False, False, "4", 1, 16, -1, True, 0.0, False, False,
                        channel_mult="1,2", arch="dit")


@pytest.mark.parametrize("extra,says", [
    (["--arch", "vit"], "unknown --arch 'vit': use unet or dit"),
    (["--dit_model", "DiT-M/2"], "unknown --dit_model 'DiT-M/2'"),
    (["--dit_model", ""], "unknown --dit_model ''"),
    (["--image_size", 9], "pick another --dit_model"),
    (["--guidance_channels", "first4"], "unknown --guidance_channels 'first4': use all or first3"),
    (["--in_channels", 2, "--guidance_channels", "first3"], "pass --guidance_channels all"),
    (["--arch", "unet", "--channel_mult", "1,2", "--attention_resolutions", 4], "this file holds a DiT (--arch dit), not a UNet (--arch unet): pass "
                         "--arch dit"),
])
def test_bad_sampling_flags_one_line(trained, tmp_path, capsys, extra, says):
    line = error_line(capsys, sample(trained, tmp_path / "out", *extra))
    assert says in line
    assert not (tmp_path / "out").exists()  # refused before the log folder


def test_bad_vae_paths_one_line(latent_dit, tmp_path, capsys):
    line = error_line(capsys, run_inprocess("image_sample", [*latent_dit, "--vae_path",
                                                             tmp_path / "none"]))
    assert "--vae_path" in line and "no such folder" in line
    (tmp_path / "empty").mkdir()
    line = error_line(capsys, run_inprocess("image_sample", [*latent_dit, "--vae_path",
                                                             tmp_path / "empty"]))
    assert "not a diffusers model folder (no config.json)" in line
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    line = error_line(capsys, run_inprocess("image_sample", [*latent_dit, "--vae_path",
                                                             tmp_path / "other"]))
    assert "is not a diffusers AutoencoderKL folder" in line


def test_vae_path_needs_diffusers(latent_dit, tiny_vae, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("no diffusers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    line = error_line(capsys, run_inprocess("image_sample", [*latent_dit, "--vae_path",
                                                             tiny_vae[0]]))
    assert line == "error: --vae_path needs the diffusers package: pip install diffusers"


def test_a_decoding_run_stopped_by_sigterm_continues_to_the_same_bytes(latent_dit, tiny_vae,
                                                                        tmp_path, monkeypatch):
    """The decoded batches are kept like any others: stopped after batch 2 of 3 (exit 75), the
    same command finishes the uninterrupted run's npz byte for byte."""
    import os
    import signal

    from guided_diffusion.runtime import kept_rounds

    flags = [*latent_dit, "--vae_path", tiny_vae[0], "--num_samples", 6, "--batch_size", 2]
    npz = "samples_6x8x8x3.npz"
    assert run_inprocess("image_sample", [*flags, "--log_dir", tmp_path / "a"]) == 0
    real = kept_rounds.KeptRounds._collect

    def collect(self, parts, streams, i, write):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, parts, streams, i, write)

    monkeypatch.setattr(kept_rounds.KeptRounds, "_collect", collect)
    assert run_inprocess("image_sample", [*flags, "--log_dir", tmp_path / "b"]) == 75
    assert not (tmp_path / "b" / npz).exists()
    monkeypatch.undo()
    assert run_inprocess("image_sample", [*flags, "--log_dir", tmp_path / "b"]) == 0
    assert (tmp_path / "b" / npz).read_bytes() == (tmp_path / "a" / npz).read_bytes()


def test_a_preempted_fp16_dit_run_resumes_to_the_uninterrupted_ones_bytes(trained, tmp_path,
                                                                          monkeypatch):
    """SIGTERM while batch 3 is read: step 4 is saved, exit 75; --resume_checkpoint auto then
    ends with every file of step 5 equal to an uninterrupted run's (fp16 loss scale, two EMA
    rates, microbatches, label dropout)."""
    import signal

    from test_resume import DIFFUSION_FILES, load, run, tensors_equal

    common = ["--data_dir", trained["data"], *TINY, "--batch_size", 4, "--microbatch", 2,
              "--use_fp16", True, "--ema_rate", "0.9,0.99", "--log_interval", 1,
              "--lr_anneal_steps", 5]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert run("image_train", [*common, "--save_interval", 1], full, monkeypatch) == 0
    assert run("image_train", [*common, "--save_interval", 100], parts, monkeypatch,
               signal_at=3, sig=signal.SIGTERM) == 75
    assert run("image_train", [*common, "--resume_checkpoint", "auto"], parts, monkeypatch) == 0
    for pattern in DIFFUSION_FILES:
        assert tensors_equal(load(full / pattern.format(5)), load(parts / pattern.format(5))), \
            pattern.format(5)


def test_image_nll_of_an_unconditional_dit(trained, tmp_path):
    torch.manual_seed(0)
    model = create_model(8, 16, 1, arch="dit", dit_model=DIT, learn_sigma=True)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    assert run_inprocess("image_nll", [
        "--model_path", tmp_path / "dit.pt", "--arch", "dit", "--dit_model", DIT,
        "--image_size", 8, "--learn_sigma", True, "--diffusion_steps", 10, "--noise_schedule", "cosine",
        "--data_dir", trained["data"], "--num_samples", 2, "--batch_size", 2,
        "--log_dir", tmp_path / "nll", "--progress", False]) == 0
    assert "bpd" in (tmp_path / "nll" / "log.txt").read_text()
