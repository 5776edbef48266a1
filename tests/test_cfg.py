"""
Classifier-free guidance: the null-class label row, label dropout in training, the guided
prediction from one batched forward pass, and the sampling scripts' --guidance_scale and
--sampler flags end to end on a tiny model trained here with --class_dropout_prob.
"""

import numpy as np
import pytest
import torch

from guided_diffusion.data.digits import write_digits
from guided_diffusion.diffusion.guidance import (
    check_guidance_scale,
    classifier_free_guidance,
    drop_labels,
)
from guided_diffusion.image_datasets import with_label_dropout
from guided_diffusion.sampling.files import to_uint8
from guided_diffusion.script_util import (
    create_classifier,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model,
)
from guided_diffusion.diffusion.denoiser import solver_sample_loop

from test_scripts import error_line, load_script, run_inprocess

pytestmark = pytest.mark.usefixtures("cpu_only", "single_thread")

CLASSES = 4
TINY = (
    "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 4 --num_head_channels 16 --diffusion_steps 50 --learn_sigma True "
    f"--noise_schedule cosine --class_cond True --num_classes {CLASSES}"
).split()
CFG = ["--class_dropout_prob", "0.3"]


def tiny_unet(class_dropout_prob=0.0, seed=0, **overrides):
    torch.manual_seed(seed)
    flags = dict(channel_mult="1,2", attention_resolutions="4", num_head_channels=16,
                 learn_sigma=True, class_cond=True, num_classes=CLASSES)
    flags.update(overrides)
    model = create_model(8, 32, 1, class_dropout_prob=class_dropout_prob, **flags)
    torch.nn.init.normal_(model.out[2].weight, std=0.05)  # the zeroed output layer says nothing
    return model.eval()


# ----------------------------------------------------------------------------- the null class


def test_the_label_embedding_gains_one_row_only_with_dropout():
    plain = tiny_unet().state_dict()
    cfg = tiny_unet(class_dropout_prob=0.1).state_dict()
    assert list(plain) == list(cfg)
    for key in plain:
        rows = 1 if key == "label_emb.weight" else 0
        assert cfg[key].shape[0] == plain[key].shape[0] + rows
    assert plain["label_emb.weight"].shape[0] == CLASSES
    with pytest.raises(ValueError, match="needs a class-conditional model: pass --class_cond True"):
        create_model(8, 32, 1, channel_mult="1,2", class_dropout_prob=0.1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        create_model(8, 32, 1, channel_mult="1,2", class_cond=True, class_dropout_prob=1.0)


def test_label_dropout_rate_and_no_draw_at_zero():
    labels = torch.randint(0, CLASSES, (20000,))
    state = torch.get_rng_state()
    assert drop_labels(labels, prob=0.0, null_label=CLASSES) is labels
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    dropped = drop_labels(labels, prob=0.25, null_label=CLASSES)
    is_null = dropped == CLASSES
    rate = is_null.float().mean().item()
    assert abs(rate - 0.25) < 4 * (0.25 * 0.75 / len(labels)) ** 0.5
    assert torch.equal(dropped[~is_null], labels[~is_null])

    class Stream:
        def __init__(self):
            self.position = 0

        def __next__(self):
            self.position += 1
            return torch.zeros(3, 1), {"y": torch.arange(3), "low_res": torch.ones(3)}

        def state_dict(self):
            return {"position": self.position}

    stream = Stream()
    assert with_label_dropout(stream, prob=0.0, null_label=CLASSES) is stream
    wrapped = with_label_dropout(stream, prob=0.999, null_label=CLASSES)
    _, kwargs = next(wrapped)
    assert kwargs["y"].tolist() == [CLASSES] * 3 and torch.equal(kwargs["low_res"], torch.ones(3))
    assert wrapped.state_dict() == {"position": 1}  # the stream's position still saves


def test_guided_prediction_from_one_batched_pass():
    model = tiny_unet(class_dropout_prob=0.1)
    calls = []

    def counting(x, t, y=None, **kwargs):
        calls.append((x.shape[0], y.clone()))
        return model(x, t, y=y)

    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([3, 20, 41])
    y = torch.tensor([0, 2, 3])
    assert classifier_free_guidance(model, 1.0, null_label=CLASSES) is model
    guided = classifier_free_guidance(counting, 2.5, null_label=CLASSES)(x, t, y=y)
    assert len(calls) == 1 and calls[0][0] == 6
    assert calls[0][1].tolist() == [0, 2, 3, CLASSES, CLASSES, CLASSES]
    with torch.no_grad():
        cond = model(x, t, y=y)
        uncond = model(x, t, y=torch.full_like(y, CLASSES))
        out = classifier_free_guidance(model, 2.5, null_label=CLASSES)(x, t, y=y)
    torch.testing.assert_close(guided.detach(), out)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # learned variances: conditional half
    with torch.no_grad():  # w = 0 is the unconditional model
        zero = classifier_free_guidance(model, 0.0, null_label=CLASSES)(x, t, y=y)
    torch.testing.assert_close(zero[:, :3], uncond[:, :3])


def test_super_res_inputs_are_repeated_for_the_unconditional_half():
    torch.manual_seed(0)
    model = sr_create_model(8, 4, 32, 1, learn_sigma=False, class_cond=True, use_checkpoint=False,
                            attention_resolutions="4", num_heads=1, num_head_channels=16,
                            num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
                            resblock_updown=False, use_fp16=False, num_classes=CLASSES,
                            channel_mult="1,2", class_dropout_prob=0.2).eval()
    torch.nn.init.normal_(model.out[2].weight, std=0.05)
    x, low_res = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    t, y = torch.tensor([5, 30]), torch.tensor([1, 3])
    with torch.no_grad():
        out = classifier_free_guidance(model, 3.0, null_label=CLASSES)(x, t, y=y, low_res=low_res)
        cond = model(x, t, y=y, low_res=low_res)
        uncond = model(x, t, y=torch.full_like(y, CLASSES), low_res=low_res)
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond))


def test_guidance_without_a_null_class_is_refused():
    with pytest.raises(ValueError, match="image_train.py --class_dropout_prob"):
        classifier_free_guidance(tiny_unet(), 2.0, null_label=CLASSES)
    with pytest.raises(ValueError, match="--class_dropout_prob"):
        check_guidance_scale(3.0, class_cond=True, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="--class_cond True --class_dropout_prob"):
        check_guidance_scale(3.0, class_cond=False, class_dropout_prob=0.0)
    check_guidance_scale(1.0, class_cond=False, class_dropout_prob=0.0)
    check_guidance_scale(3.0, class_cond=True, class_dropout_prob=0.1)


# ----------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 steps with --class_dropout_prob, then resumed for one more."""
    root = tmp_path_factory.mktemp("cfg")
    data = write_digits(str(root / "digits"), image_size=8, limit=40)
    # The digits have 10 classes; keep four so that --num_classes 4 fits.
    import os

    for name in os.listdir(data):
        if int(name.split("_")[0]) >= CLASSES:
            os.remove(os.path.join(data, name))
    log = root / "train"
    common = ["--data_dir", data, *TINY, *CFG, "--batch_size", 4, "--log_interval", 1,
              "--log_dir", log]
    assert run_inprocess("image_train", [*common, "--max_steps", 2, "--save_interval", 2]) == 0
    return {"root": root, "data": data, "log": log, "common": common}


def test_a_dropout_checkpoint_resumes(trained):
    state = torch.load(trained["log"] / "model000002.pt", weights_only=True)
    assert state["label_emb.weight"].shape[0] == CLASSES + 1
    assert run_inprocess("image_train", [
        *trained["common"], "--resume_checkpoint", trained["log"] / "model000002.pt",
        "--max_steps", 1]) == 0
    resumed = torch.load(trained["log"] / "model000003.pt", weights_only=True)
    assert resumed["label_emb.weight"].shape[0] == CLASSES + 1
    header, *rows = (trained["log"] / "progress.csv").read_text().splitlines()
    assert float(rows[-1].split(",")[header.split(",").index("step")]) == 3  # steps taken
    # The resumed checkpoint samples, guided, with a solver.
    out = trained["root"] / "resumed_samples"
    images, labels = sample(trained, out, *CFG, "--sampler", "dpmpp_2m", "--evaluations",
                            "4", "--guidance_scale", 2.0, checkpoint="model000003.pt")
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0
    assert set(labels.tolist()) <= set(range(CLASSES))


def sample(trained, out, *extra, checkpoint="model000002.pt", num=3):
    args = ["--model_path", trained["log"] / checkpoint, *TINY, "--num_samples", num,
            "--batch_size", num, "--seed", 4, "--log_dir", out, "--progress", "False", *extra]
    status = run_inprocess("image_sample", args)
    if status != 0:
        return status
    with np.load(out / f"samples_{num}x8x8x3.npz") as npz:
        return npz["arr_0"], npz["arr_1"]


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "dpmpp_2m_sde"])
def test_guidance_scale_one_is_plain_conditional_sampling(trained, tmp_path, sampler):
    budget = "--timestep_respacing" if sampler == "ddpm" else "--evaluations"
    flags = ["--sampler", sampler, budget, "5"]
    plain = sample(trained, tmp_path / "plain", *CFG, *flags)
    scale_one = sample(trained, tmp_path / "one", *CFG, *flags, "--guidance_scale", 1.0)
    guided = sample(trained, tmp_path / "guided", *CFG, *flags, "--guidance_scale", 4.0)
    np.testing.assert_array_equal(plain[0], scale_one[0])
    np.testing.assert_array_equal(plain[1], scale_one[1])
    np.testing.assert_array_equal(plain[1], guided[1])  # same labels: same seed contract
    assert not np.array_equal(plain[0], guided[0])


@pytest.mark.parametrize("sampler,evaluations,grid", [("heun", 7, ""),
                                                      ("dpmpp_2m_sde", 5, "karras")])
def test_guided_solver_sampling_matches_the_library(trained, tmp_path, sampler, evaluations, grid):
    images, labels = sample(trained, tmp_path, *CFG, "--sampler", sampler, "--evaluations",
                            evaluations, "--sigma_grid", grid, "--guidance_scale", 3.0)
    parsed = vars(load_script("image_sample").create_argparser().parse_args(TINY))
    flags = {k: parsed[k] for k in model_and_diffusion_defaults()}
    model, full = create_model_and_diffusion(**flags, num_classes=CLASSES, class_dropout_prob=0.3)
    model.load_state_dict(torch.load(trained["log"] / "model000002.pt", weights_only=True))
    model.eval()
    torch.manual_seed(4)
    y = torch.randint(0, CLASSES, (3,))
    expected = solver_sample_loop(
        full, classifier_free_guidance(model, 3.0, null_label=CLASSES), (3, 3, 8, 8),
        sampler=sampler, evaluations=evaluations, model_kwargs={"y": y},
        sigma_grid=grid or None)
    np.testing.assert_array_equal(labels, y.numpy())
    np.testing.assert_array_equal(images, to_uint8(expected).numpy())


def test_classifier_and_classifier_free_guidance_together(trained, tmp_path):
    torch.manual_seed(1)
    classifier = create_classifier(8, False, 32, 1, "4", True, True, "attention",
                                   num_classes=CLASSES, classifier_channel_mult="1,2")
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    base = ["--model_path", trained["log"] / "model000002.pt", *TINY, *CFG,
            "--classifier_width", 32, "--classifier_depth", 1, "--classifier_channel_mult", "1,2",
            "--classifier_attention_resolutions", 4, "--classifier_path", tmp_path / "classifier.pt",
            "--num_samples", 2, "--batch_size", 2, "--seed", 0, "--progress", "False",
            "--log_dir", tmp_path, "--evaluations", 5, "--sampler", "dpmpp_2m",
            "--guidance_scale", 2.0, "--overwrite", True]
    outputs = []
    for scale in (0.0, 20.0):
        assert run_inprocess("classifier_sample", [*base, "--classifier_scale", scale]) == 0
        with np.load(tmp_path / "samples_2x8x8x3.npz") as npz:
            outputs.append(npz["arr_0"])
    assert not np.array_equal(*outputs)  # the classifier gradient reached the solver


def test_super_res_sampling_with_guidance_and_a_solver(tmp_path):
    model = sr_create_model(8, 4, 32, 1, learn_sigma=True, class_cond=True, use_checkpoint=False,
                            attention_resolutions="4", num_heads=1, num_head_channels=16,
                            num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
                            resblock_updown=False, use_fp16=False, num_classes=CLASSES,
                            channel_mult="1,2", class_dropout_prob=0.1)
    torch.save(model.state_dict(), tmp_path / "sr.pt")
    base = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "base.npz", base, np.array([0, 3]))
    assert run_inprocess("super_res_sample", [
        "--model_path", tmp_path / "sr.pt", "--large_size", 8, "--small_size", 4,
        "--channel_mult", "1,2", "--num_channels", 32, "--num_res_blocks", 1,
        "--attention_resolutions", 4, "--num_head_channels", 16, "--learn_sigma", True,
        "--diffusion_steps", 50, "--class_cond", True, "--num_classes", CLASSES,
        "--class_dropout_prob", 0.1, "--base_samples", tmp_path / "base.npz", "--num_samples", 2,
        "--batch_size", 2, "--sampler", "euler", "--evaluations", 4,
        "--guidance_scale", 2.0, "--log_dir", tmp_path, "--progress", "False"]) == 0
    with np.load(tmp_path / "samples_2x8x8x3.npz") as npz:
        assert npz["arr_0"].shape == (2, 8, 8, 3) and npz["arr_1"].tolist() == [0, 3]


# The checks after the sampler ones are about flags missing on the command line, as for a
# released checkpoint: --config none keeps the run's args.json (which has them) out of it.
RELEASED = ("--config", "none")


@pytest.mark.parametrize("flags,says,not_says", [
    ((*CFG, "--sampler", "plms"),
     ["unknown --sampler 'plms'; known samplers: ddpm, ddim, euler, heun, dpmpp_2m, "
      "dpmpp_3m, euler_ancestral, dpmpp_2m_sde"], []),
    ((*CFG, "--sampler", "heun", "--use_ddim", "True"), ["pass only one of them"], []),
    ((*CFG, "--sampler", "dpmpp_2m", "--evaluations", "2"),
     ["dpmpp_2m needs at least 3 model evaluations"], []),
    # One meaning per flag: steps for ddpm/ddim, model evaluations for the solvers.
    ((*CFG, "--sampler", "dpmpp_2m", "--timestep_respacing", "10", "--evaluations", "10"),
     ["drop --timestep_respacing", "--evaluations N"], []),
    ((*CFG, "--sampler", "heun"), ["--sampler heun needs --evaluations N"], []),
    ((*CFG, "--sampler", "ddim", "--evaluations", "10"),
     ["--sampler ddim takes its steps from --timestep_respacing"], []),
    ((*CFG, "--sampler", "heun", "--evaluations", "10", "--sigma_grid", "edm"),
     ["unknown --sigma_grid 'edm'; known grids: karras, logsnr, time"], []),
    # A model trained without a null class cannot be guided without a classifier.
    ((*RELEASED, "--guidance_scale", 3.0), ["image_train.py --class_dropout_prob"], []),
    ((*RELEASED, "--class_cond", "False", "--guidance_scale", 3.0),
     ["--class_cond True --class_dropout_prob"], []),
    # The checkpoint has a null-class row: the explainer names the flag, not a wrong class count.
    (RELEASED, ["pass --class_dropout_prob 0.1"], ["--num_classes 5"]),
    ((*RELEASED, "--num_classes", "1000"), ["--num_classes 4 --class_dropout_prob 0.1"], []),
])
def test_bad_input_one_liners(trained, tmp_path, capsys, flags, says, not_says):
    line = error_line(capsys, sample(trained, tmp_path, *flags))
    for fragment in says:
        assert fragment in line
    for fragment in not_says:
        assert fragment not in line


def test_guidance_needs_no_model_flags_beside_the_runs_args_json(trained, tmp_path):
    """With the run's args.json beside the checkpoint, guidance needs no model flags at all."""
    assert sample(trained, tmp_path, "--guidance_scale", 3.0) != 2


# ----------------------------------------------------------------------------- sampler_fid.py


def test_classifier_features_are_the_penultimate_layer():
    from guided_diffusion.cgan.evaluation import train_classifier
    from sampler_fid_lib import classifier_features

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=gen)
    classifier = train_classifier(images, torch.arange(40) % 3, num_classes=3, steps=5)
    features = classifier_features(classifier, images, batch_size=16)
    assert features.shape == (40, 64) and features.dtype == np.float64
    assert (features >= 0).all() and (features > 0).any()  # after the ReLU
    with torch.no_grad():  # the last layer on these features gives the classifier's logits
        logits = classifier.head[-1](torch.from_numpy(features).float())
        torch.testing.assert_close(logits, classifier(images), rtol=1e-5, atol=1e-5)


def test_sampler_fid_script(trained, tmp_path):
    import json

    status = run_inprocess("sampler_fid", [
        "--model_path", trained["log"] / "model000002.pt", "--data_dir", trained["data"], *TINY,
        *CFG, "--samplers", "ddim,heun,dpmpp_2m", "--evaluations", "4,3", "--guidance_scales",
        "1,2.5", "--num_samples", 8, "--batch_size", 5, "--classifier_steps", 10,
        "--log_dir", tmp_path, "--progress", "False"])
    assert status == 0
    report = json.loads((tmp_path / "sampler_fid.json").read_text())
    rows = report["rows"]
    configs = [(r["guidance_scale"], r["sampler"], r["budget"]) for r in rows]
    assert configs == [(w, n, b) for w in (1.0, 2.5) for n in ("ddim", "heun", "dpmpp_2m")
                       for b in (3, 4)]
    # Evaluations counted on the model: heun spends an even budget minus one.
    used = {(n, b): r["evaluations"] for r in rows for n, b in [(r["sampler"], r["budget"])]}
    assert used == {("ddim", 3): 3, ("ddim", 4): 4, ("heun", 3): 3, ("heun", 4): 3,
                    ("dpmpp_2m", 3): 3, ("dpmpp_2m", 4): 4}
    assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert report["num_samples"] == 8 and report["subset_real_fid"] >= 0
    table = (tmp_path / "sampler_fid.md").read_text()
    assert "classifier-free guidance w = 2.5" in table and "| heun |" in table
    assert (tmp_path / "sampler_fid.png").stat().st_size > 0
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert len(grids) == len(rows) and "w2.5_heun_4.png" in grids

    # Samplers measured in another process merge into one report.
    from sampler_fid_lib import merge_reports

    assert run_inprocess("sampler_fid", [
        "--model_path", trained["log"] / "model000002.pt", "--data_dir", trained["data"], *TINY,
        *CFG, "--samplers", "euler", "--evaluations", "3", "--num_samples", 8,
        "--classifier_steps", 10, "--log_dir", tmp_path / "euler", "--progress", "False"]) == 0
    text = merge_reports([tmp_path / "sampler_fid.json", tmp_path / "euler" / "sampler_fid.json"],
                         tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "sampler_fid.json").read_text())
    assert len(merged["rows"]) == len(rows) + 1 and "| euler |" in text
    with pytest.raises(ValueError, match="same --data_dir, --seed and --num_samples"):
        assert run_inprocess("sampler_fid", [
            "--model_path", trained["log"] / "model000002.pt", "--data_dir", trained["data"],
            *TINY, *CFG, "--samplers", "euler", "--evaluations", "3", "--num_samples", 6,
            "--classifier_steps", 10, "--log_dir", tmp_path / "six", "--progress", "False"]) == 0
        merge_reports([tmp_path / "sampler_fid.json", tmp_path / "six" / "sampler_fid.json"],
                      tmp_path / "merged")


def test_sampler_fid_same_noise_for_every_configuration(trained):
    """A solver and DDIM on one evaluation budget start from the same x_T; guidance changes it."""
    from sampler_fid_lib import generate
    from guided_diffusion.script_util import diffusion_from_flags

    parsed = vars(load_script("image_sample").create_argparser().parse_args(TINY))
    flags = {k: parsed[k] for k in model_and_diffusion_defaults()}
    model, _ = create_model_and_diffusion(**flags, num_classes=CLASSES, class_dropout_prob=0.3)
    model.load_state_dict(torch.load(trained["log"] / "model000002.pt", weights_only=True))
    model.eval()
    first = {}

    def run(sampler, scale, batch_size):
        calls = []

        def watched(x, t, **kwargs):
            calls.append(x[: x.shape[0] // (1 if scale == 1 else 2)].clone())
            return model(x, t, **kwargs)

        images, labels, used = generate(
            watched, diffusion_from_flags(flags, "5"), sampler=sampler, evaluations=5,
            guidance_scale=scale, num_samples=6, batch_size=batch_size, num_classes=CLASSES,
            seed=3, image_size=8)
        return images, labels, calls, used

    _, labels, calls, used = run("ddim", 1.0, 6)
    assert labels.tolist() == [0, 1, 2, 3, 0, 1] and used == 5
    first["ddim"] = calls[0]
    _, _, calls, used = run("dpmpp_2m", 1.0, 6)
    # The solver's state at its first (largest) noise level is x_T read at that level.
    torch.testing.assert_close(calls[0], first["ddim"])
    guided, _, calls, used = run("dpmpp_2m", 3.0, 4)  # two batches (4 + 2)
    assert used == 5
    torch.testing.assert_close(torch.cat([calls[0], calls[5]]), first["ddim"])
    plain, _, _, _ = run("dpmpp_2m", 1.0, 4)
    assert not np.array_equal(guided, plain)


def test_sampler_fid_bad_input(trained, tmp_path, capsys):
    base = ["--model_path", trained["log"] / "model000002.pt", "--data_dir", trained["data"],
            *TINY, "--num_samples", 4, "--log_dir", tmp_path]
    line = error_line(capsys, run_inprocess("sampler_fid", [*base, *CFG, "--samplers", "ddim,rk4"]))
    assert ("unknown --sampler 'rk4'; known samplers: ddpm, ddim, euler, heun, dpmpp_2m, "
            "dpmpp_3m, euler_ancestral, dpmpp_2m_sde") in line
    line = error_line(capsys, run_inprocess("sampler_fid", [
        *base, *CFG, "--samplers", "heun", "--evaluations", "2,10"]))
    assert "heun needs at least 3 model evaluations" in line
    line = error_line(capsys, run_inprocess("sampler_fid", [*base, "--guidance_scales", "1,3",
                                                            "--config", "none"]))
    assert "image_train.py --class_dropout_prob" in line
    assert not (tmp_path / "sampler_fid.json").exists()
