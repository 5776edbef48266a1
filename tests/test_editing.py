"""
Editing real images: RePaint inpainting (diffusion/inpaint.py), SDEdit (diffusion/sdedit.py) and
their scripts (image_inpaint.py, image_edit.py).

The oracle is Gaussian data with its exact denoiser wrapped as a noise-prediction model
(experiments/oracles.py): the law of the inpainted pixels given the kept ones is then known in
closed form, and SDEdit of exact data samples must give the data distribution back.
"""

import math

import numpy as np
import pytest
import torch

from inpaint_gaussian import DIM, KEEP, VALUES, gaussian_data
from inpaint_gaussian import monte_carlo_level as monte_carlo_w2
from oracles import gaussian_w2, mixture_model
from guided_diffusion.diffusion.inpaint import inpaint_loop, repaint_schedule
from guided_diffusion.diffusion.sdedit import edit_steps, sdedit_loop
from guided_diffusion.script_util import create_gaussian_diffusion

N = 4000


pytestmark = pytest.mark.usefixtures("single_thread")


def known_batch(n=N):
    known = torch.zeros(n, 1, 1, DIM)
    known[..., KEEP] = VALUES.float()
    return known


def fitted_w2(samples, mean, cov):
    samples = samples.double()
    return gaussian_w2(samples.mean(0), torch.cov(samples.T), mean, cov)


# ----------------------------------------------------------------------------- RePaint


def test_repaint_schedule():
    assert repaint_schedule(5) == [4, 3, 2, 1, 0]
    assert repaint_schedule(3, 1, 2) == [2, 2, 1, 1, 0, 0]
    # Blocks of 2 from the top, each run twice; the last block is shorter.
    assert repaint_schedule(5, 2, 2) == [4, 3, 4, 3, 2, 1, 2, 1, 0, 0]
    assert len(repaint_schedule(50, 10, 7)) == 50 * 7
    with pytest.raises(ValueError, match="jump_length must be a positive integer"):
        repaint_schedule(5, 0, 1)
    with pytest.raises(ValueError, match="resamplings must be a positive integer"):
        repaint_schedule(5, 1, 1.5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_known_region_is_the_input_exactly(sampler):
    data = gaussian_data()
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="20")
    full = create_gaussian_diffusion(steps=1000)
    known = data.sample(64, torch.Generator().manual_seed(0)).float().view(64, 1, 1, DIM)
    mask = torch.rand(64, 1, 1, DIM, generator=torch.Generator().manual_seed(1)) < 0.5
    guide = []

    def cond_fn(x, t, **kwargs):  # classifier guidance towards 0.5, as a gradient
        guide.append(t)
        return 0.5 - x

    torch.manual_seed(0)
    out = inpaint_loop(diffusion, data.model(full.alphas_cumprod), known.shape, known=known,
                       mask=mask, sampler=sampler, jump_length=3, resamplings=2, cond_fn=cond_fn)
    assert torch.equal(out[mask], known[mask])
    assert len(guide) == 20 * 2 and not torch.equal(out[~mask], known[~mask])


def test_inpainting_approaches_the_conditional_law_as_resamplings_grow():
    """
    The inpainted pixels of Gaussian data: their fitted Gaussian approaches the exact
    conditional law as the number of resamplings grows (50 respaced steps, jump length 1).
    """
    data = gaussian_data()
    full = create_gaussian_diffusion(steps=1000)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="50")
    mean, cov = data.conditional(KEEP, VALUES)
    model = data.model(full.alphas_cumprod)
    distances = []
    for resamplings in (1, 5, 20):
        torch.manual_seed(0)
        out = inpaint_loop(diffusion, model, (N, 1, 1, DIM), known=known_batch(),
                           mask=KEEP.view(1, 1, 1, DIM), resamplings=resamplings,
                           clip_denoised=False)
        distances.append(fitted_w2(out.view(N, DIM)[:, ~KEEP], mean, cov))
    level = monte_carlo_w2(mean, cov, N)
    print(f"\nW2 to the conditional law at 1, 5, 20 resamplings: {np.round(distances, 4)}; "
          f"Monte Carlo level {level:.4f}")
    # Each step down is larger than what sampling noise could explain.
    assert distances[0] - distances[1] > level and distances[1] - distances[2] > level
    assert distances[2] < distances[0] / 4


def test_inpainting_with_nothing_kept_is_ddim_and_with_everything_kept_is_the_input():
    data = gaussian_data()
    full = create_gaussian_diffusion(steps=1000)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="10")
    model = data.model(full.alphas_cumprod)
    noise = torch.randn(32, 1, 1, DIM, generator=torch.Generator().manual_seed(2))
    known = known_batch(32)
    # DDIM with eta 0 uses none of its draws: keeping nothing is plain DDIM from that noise.
    nothing = inpaint_loop(diffusion, model, noise.shape, known=known, noise=noise,
                           mask=torch.zeros(1, 1, 1, DIM, dtype=torch.bool), sampler="ddim")
    assert torch.equal(nothing, diffusion.ddim_sample_loop(model, noise.shape, noise=noise))
    everything = inpaint_loop(diffusion, model, noise.shape, known=known, noise=noise,
                              mask=torch.ones(1, 1, 1, DIM, dtype=torch.bool))
    assert torch.equal(everything, known)


def test_inpainting_draws_in_the_documented_order():
    data = gaussian_data()
    full = create_gaussian_diffusion(steps=1000)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="6")
    shape = (3, 1, 1, DIM)
    torch.manual_seed(7)
    inpaint_loop(diffusion, data.model(full.alphas_cumprod), shape, known=known_batch(3),
                 mask=KEEP.view(1, 1, 1, DIM), jump_length=2, resamplings=3)
    after = torch.randn(2)
    torch.manual_seed(7)
    torch.randn(*shape)  # x_T
    schedule = repaint_schedule(6, 2, 3)
    jumps = sum(b > a - 1 for a, b in zip(schedule, schedule[1:]))
    assert jumps == 3 * 2  # three blocks, each run three times: two jumps back per block
    for _ in range(2 * len(schedule) + jumps):  # step + known noise per step, one per jump
        torch.randn(*shape)
    assert torch.equal(after, torch.randn(2))


def test_inpainting_refuses_what_it_cannot_do():
    diffusion = create_gaussian_diffusion(steps=100)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    known = torch.zeros(2, 3, 4, 4)
    good = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not fit images of shape"):
        inpaint_loop(diffusion, model, known.shape, known=known,
                     mask=torch.ones(2, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        inpaint_loop(diffusion, model, known.shape, known=known, mask=good.float())
    with pytest.raises(ValueError, match="sampler 'dpmpp_2m' is not one of ddpm, ddim"):
        inpaint_loop(diffusion, model, known.shape, known=known, mask=good, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match=r"known images of shape \(2, 3, 4, 4\) != requested"):
        inpaint_loop(diffusion, model, (2, 3, 8, 8), known=known, mask=good)


def test_the_loops_share_p_sample_loops_options_and_refuse_a_misspelt_one():
    from guided_diffusion.diffusion.denoiser import solver_sample_loop

    diffusion = create_gaussian_diffusion(steps=30)
    seen = []

    def model(x, t, **kwargs):
        seen.append(kwargs)
        return torch.zeros_like(x)

    x = torch.zeros(2, 1, 1, 3)
    mask = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    label = {"y": torch.tensor([1, 2])}
    calls = {
        "inpaint_loop": lambda **kw: inpaint_loop(diffusion, model, x.shape, known=x, mask=mask,
                                                  **kw),
        "sdedit_loop": lambda **kw: sdedit_loop(diffusion, model, x, strength=0.5, **kw),
        "solver_sample_loop": lambda **kw: solver_sample_loop(diffusion, model, x.shape,
                                                              sampler="euler", evaluations=3, **kw),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name}\(\) got unexpected keyword\(s\) clip_denoise;"):
            call(clip_denoise=False)
        # The given options reach the model (model_kwargs, the same dict) and the start (noise).
        seen.clear()
        start = torch.full(x.shape, 3.0)
        out = call(model_kwargs=label, noise=start, clip_denoised=False)
        assert seen and all(kwargs["y"] is label["y"] for kwargs in seen), name
        assert out.shape == x.shape and torch.isfinite(out).all()
    # noise= is the start: at strength 1 the edit is DDIM sampling from it.
    ddim = sdedit_loop(diffusion, model, x, strength=1.0, sampler="ddim", noise=start,
                       clip_denoised=False)
    assert torch.equal(ddim, diffusion.ddim_sample_loop(model, x.shape, noise=start,
                                                        clip_denoised=False))


# ----------------------------------------------------------------------------- SDEdit


@pytest.mark.parametrize("sampler,options", [
    ("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {"evaluations": 6}),
    ("euler_ancestral", {"evaluations": 6}),
])
def test_strength_one_is_sampling_from_noise_with_the_same_seed(sampler, options):
    from guided_diffusion.diffusion.denoiser import solver_sample_loop

    full = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine",
                                          timestep_respacing="8")
    model = mixture_model(full.alphas_cumprod)
    images = torch.rand(16, 1) * 2 - 1
    torch.manual_seed(3)
    edited = sdedit_loop(diffusion, model, images, strength=1.0, sampler=sampler, **options)
    torch.manual_seed(3)
    if sampler == "ddpm":
        sampled = diffusion.p_sample_loop(model, images.shape)
    elif sampler == "ddim":
        sampled = diffusion.ddim_sample_loop(model, images.shape, eta=0.5)
    else:
        sampled = solver_sample_loop(diffusion, model, images.shape, sampler=sampler, **options)
    assert torch.equal(edited, sampled)


@pytest.mark.parametrize("sampler,options", [("ddpm", {}), ("dpmpp_2m", {"evaluations": 5})])
def test_strength_near_zero_returns_the_input(sampler, options):
    data = gaussian_data()
    full = create_gaussian_diffusion(steps=1000)
    images = data.sample(256, torch.Generator().manual_seed(0)).float().view(256, 1, 1, DIM)
    torch.manual_seed(0)
    edited = sdedit_loop(full, data.model(full.alphas_cumprod), images, strength=1e-4,
                         sampler=sampler, clip_denoised=False, **options)
    # One step at timestep 0: the input noised by sigma_0 = sqrt((1 - abar_0) / abar_0) (0.01)
    # and denoised by the exact E[x_0 | x]. Its mean squared error is at most sigma_0^2 (that
    # of returning x itself), so the change is about one noise level, about 1 uint8 level.
    sigma_0 = math.sqrt((1 - full.alphas_cumprod[0]) / full.alphas_cumprod[0])
    assert (edited - images).pow(2).mean().sqrt() < 1.1 * sigma_0
    assert (edited - images).abs().max() < 5 * sigma_0


@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("dpmpp_2m_sde", {"evaluations": 30})])
def test_sdedit_of_data_keeps_the_data_law_and_forgets_the_input_with_strength(sampler, options):
    """
    Noising exact data samples to t0 and running an exact reverse process gives the data law
    back at every strength, while the edit's correlation with its input falls as strength grows.
    """
    data = gaussian_data()
    full = create_gaussian_diffusion(steps=1000)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="100")
    model = data.model(full.alphas_cumprod)
    images = data.sample(N, torch.Generator().manual_seed(1))
    level = monte_carlo_w2(data.mean, data.cov, N)
    correlations = []
    for strength in (0.3, 0.6, 1.0):
        torch.manual_seed(2)
        edited = sdedit_loop(diffusion, model, images.float().view(N, 1, 1, DIM),
                             strength=strength, sampler=sampler, clip_denoised=False, **options)
        edited = edited.view(N, DIM).double()
        # The discretisation adds a little: allow twice the noise level of N exact draws.
        assert fitted_w2(edited, data.mean, data.cov) < 2 * level, strength
        correlations.append(float(torch.corrcoef(torch.stack([images[:, 0], edited[:, 0]]))[0, 1]))
    print(f"\n{sampler}: correlation of edit and input at strength 0.3, 0.6, 1: "
          f"{np.round(correlations, 3)}")
    assert correlations[0] > correlations[1] > correlations[2]
    assert abs(correlations[2]) < 4 / math.sqrt(N)  # strength 1 ignores the input


def test_edit_strength_maps_to_steps_and_bad_values_are_refused():
    assert edit_steps(1.0, 50) == 50 and edit_steps(0.5, 50) == 25 and edit_steps(0.3, 1000) == 300
    assert edit_steps(1e-6, 50) == 1 and edit_steps(0.51, 50) == 26
    full = create_gaussian_diffusion(steps=100)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for bad in (0.0, -0.5, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
            sdedit_loop(full, model, torch.zeros(1, 1), strength=bad)
    with pytest.raises(ValueError, match="needs its number of model evaluations"):
        sdedit_loop(full, model, torch.zeros(1, 1), strength=0.5, sampler="heun")
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        sdedit_loop(full, model, torch.zeros(1, 1), strength=0.5, sampler="plms")


def test_editing_steps_never_read_tensors_on_the_host():
    """RePaint's jumps and known-pixel noise and SDEdit's start use host integers and floats."""
    from test_fast_paths import trap_host_reads

    from guided_diffusion.diffusion.guidance import make_classifier_cond_fn
    from guided_diffusion.script_util import create_classifier, create_model

    torch.manual_seed(0)
    model = create_model(8, 32, 1, channel_mult="1,2", learn_sigma=True, class_cond=True,
                         num_classes=3, attention_resolutions="4", num_head_channels=16).eval()
    classifier = create_classifier(8, False, 32, 1, "4", True, True, "attention",
                                   num_classes=3, classifier_channel_mult="1,2").eval()
    cond_fn = make_classifier_cond_fn(classifier, 1.0)
    diffusion = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="4")
    known = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[..., :3] = True
    y = torch.tensor([0, 2])
    # Warm-up: the first calls fill the diffusion's device tables.
    inpaint_loop(diffusion, model, known.shape, known=known, mask=mask, resamplings=2,
                 model_kwargs={"y": y})
    with trap_host_reads():
        inpaint_loop(diffusion, model, known.shape, known=known, mask=mask, jump_length=2,
                     resamplings=2, cond_fn=cond_fn, model_kwargs={"y": y})
        sdedit_loop(diffusion, model, known, strength=0.5, sampler="ddpm", cond_fn=cond_fn,
                    model_kwargs={"y": y})
        sdedit_loop(diffusion, model, known, strength=0.5, sampler="dpmpp_2m_sde",
                    evaluations=3, model_kwargs={"y": y})


# ----------------------------------------------------------------------------- the scripts

CLASSES = 4
TINY = (
    "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 4 --num_head_channels 16 --diffusion_steps 50 --learn_sigma True "
    f"--noise_schedule cosine --class_cond True --num_classes {CLASSES} --progress False"
).split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny class-conditional model (random weights), 3 RGB images and their masks."""
    from PIL import Image

    from guided_diffusion.script_util import create_model_and_diffusion
    from test_scripts import load_script

    root = tmp_path_factory.mktemp("editing")
    parsed = vars(load_script("image_edit").create_argparser().parse_args(TINY))
    flags = {k: parsed[k] for k in model_and_diffusion_flag_names()}
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags, num_classes=CLASSES)
    torch.nn.init.normal_(model.out[2].weight, std=0.05)  # the zeroed output layer says nothing
    torch.save(model.state_dict(), root / "model.pt")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.png")
        keep = np.zeros((8, 8), np.uint8)
        keep[:, : {"a": 4, "b": 2, "c": 6}[name]] = 255  # white = keep: the left columns
        Image.fromarray(keep).save(root / "masks" / f"{name}.png")
    return dict(root=root, model=root / "model.pt", flags=flags)


def model_and_diffusion_flag_names():
    from guided_diffusion.script_util import model_and_diffusion_defaults

    return list(model_and_diffusion_defaults())


def run_script(name, *args):
    from test_scripts import run_inprocess

    return run_inprocess(name, [*TINY, *args])


def load_tiny_model(tiny):
    from guided_diffusion.script_util import create_model_and_diffusion

    model, diffusion = create_model_and_diffusion(**tiny["flags"], num_classes=CLASSES)
    model.load_state_dict(torch.load(tiny["model"], weights_only=True))
    return model.eval(), diffusion


def read_folder(folder):
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / f"{n}.png")) for n in ("a", "b", "c")])


def test_inpaint_script_is_the_library_and_keeps_the_known_pixels(tiny, tmp_path):
    from guided_diffusion.sampling.files import to_uint8, uint8_to_model_input
    from guided_diffusion.script_util import create_gaussian_diffusion as diffusion_of

    out = tmp_path / "out"
    assert run_script("image_inpaint", "--model_path", tiny["model"], "--input",
                      tiny["root"] / "images", "--mask", tiny["root"] / "masks",
                      "--timestep_respacing", 5, "--jump_length", 2, "--resamplings", 2,
                      "--class_label", 2, "--seed", 3, "--batch_size", 3, "--log_dir", out) == 0
    with np.load(out / "samples_3x8x8x3.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert labels.tolist() == [2, 2, 2]
    np.testing.assert_array_equal(read_folder(out / "inpainted"), images)
    inputs = read_folder(tiny["root"] / "images")
    keep = read_folder(tiny["root"] / "masks") >= 128
    np.testing.assert_array_equal(images[keep], inputs[keep])

    model, _ = load_tiny_model(tiny)
    diffusion = diffusion_of(steps=50, learn_sigma=True, noise_schedule="cosine",
                             timestep_respacing="5")
    torch.manual_seed(3)
    expected = inpaint_loop(diffusion, model, (3, 3, 8, 8), known=uint8_to_model_input(inputs),
                            mask=torch.from_numpy(keep).unsqueeze(1), jump_length=2,
                            resamplings=2, model_kwargs={"y": torch.full((3,), 2)})
    expected = to_uint8(expected).numpy()
    np.testing.assert_array_equal(images[~keep], expected[~keep])
    assert np.abs(images[~keep].astype(int) - inputs[~keep]).max() > 0  # something was painted


@pytest.mark.parametrize("sampler", [("--use_ddim", "True", "--timestep_respacing", "ddim5"),
                                     ("--sampler", "dpmpp_2m_sde", "--evaluations", 4)])
def test_edit_script_at_strength_one_is_image_sample_with_the_same_seed(tiny, tmp_path, sampler):
    common = ["--model_path", tiny["model"], "--seed", 4, "--batch_size", 3, *sampler]
    assert run_script("image_edit", *common, "--input", tiny["root"] / "images",
                      "--edit_strength", 1.0, "--log_dir", tmp_path / "edit") == 0
    assert run_script("image_sample", *common, "--num_samples", 3,
                      "--log_dir", tmp_path / "sample") == 0
    with np.load(tmp_path / "edit" / "samples_3x8x8x3.npz") as edit, \
            np.load(tmp_path / "sample" / "samples_3x8x8x3.npz") as sample:
        np.testing.assert_array_equal(edit["arr_0"], sample["arr_0"])
        np.testing.assert_array_equal(edit["arr_1"], sample["arr_1"])  # labels drawn first
    # A small strength stays near the input.
    assert run_script("image_edit", *common, "--input", tiny["root"] / "images",
                      "--edit_strength", 0.05, "--log_dir", tmp_path / "small") == 0
    with np.load(tmp_path / "small" / "samples_3x8x8x3.npz") as small:
        inputs = read_folder(tiny["root"] / "images").astype(int)
        near = np.abs(small["arr_0"].astype(int) - inputs).mean()
        far = np.abs(edit_images(tmp_path / "edit") - inputs).mean()
        assert near < far / 2, (near, far)


def edit_images(folder):
    with np.load(folder / "samples_3x8x8x3.npz") as npz:
        return npz["arr_0"].astype(int)


def test_classifier_guidance_reaches_the_edit(tiny, tmp_path):
    from guided_diffusion.script_util import create_classifier

    torch.manual_seed(1)
    classifier = create_classifier(8, False, 32, 1, "4", True, True, "attention",
                                   num_classes=CLASSES, classifier_channel_mult="1,2")
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    outputs = []
    for scale in (0.0, 30.0):
        folder = tmp_path / f"scale{scale:g}"
        assert run_script(
            "image_edit", "--model_path", tiny["model"], "--input", tiny["root"] / "images",
            "--classifier_path", tmp_path / "classifier.pt", "--classifier_scale", scale,
            "--classifier_width", 32, "--classifier_depth", 1, "--classifier_channel_mult",
            "1,2", "--classifier_attention_resolutions", 4, "--class_label", 1,
            "--edit_strength", 0.6, "--timestep_respacing", 10, "--seed", 0,
            "--log_dir", folder) == 0
        outputs.append(edit_images(folder))
    assert not np.array_equal(*outputs)


def test_bad_input_is_one_line(tiny, tmp_path, capsys):
    from PIL import Image

    from test_scripts import error_line

    images = tiny["root"] / "images"
    image = images / "a.png"

    def inpaint(*args):
        return error_line(capsys, run_script("image_inpaint", "--model_path", tiny["model"],
                                             "--log_dir", tmp_path, *args))

    def edit(*args):
        return error_line(capsys, run_script("image_edit", "--model_path", tiny["model"],
                                             "--log_dir", tmp_path, *args))

    Image.fromarray(np.full((9, 9), 255, np.uint8)).save(tmp_path / "big.png")
    line = inpaint("--input", image, "--mask", tmp_path / "big.png")
    assert "mask" in line and "is 9x9 but image" in line and "give a mask of the image's size" in line
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    line = inpaint("--input", image, "--mask", tmp_path / "white.png")
    assert "keeps every pixel" in line and "--invert_mask True" in line
    line = inpaint("--input", image, "--mask", tmp_path / "black.png")
    assert "keeps no pixel" in line
    line = inpaint("--input", image, "--mask", tmp_path / "white.png", "--invert_mask", "True")
    assert "keeps no pixel" in line and "black = keep" in line
    rgba = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    line = inpaint("--input", tmp_path / "rgba.png", "--mask", tiny["root"] / "masks" / "a.png")
    assert "has 4 channels (RGBA)" in line
    line = edit("--input", tmp_path / "rgba.png")
    assert "has 4 channels (RGBA)" in line
    line = inpaint("--input", image, "--mask", tiny["root"] / "masks" / "a.png",
                   "--sampler", "dpmpp_2m", "--evaluations", 10)
    assert "use --sampler ddpm or ddim" in line
    line = inpaint("--input", images, "--mask", tmp_path / "nomasks")
    assert "--mask" in line and "nomasks" in line
    for strength in (0, 1.5, -0.2):
        line = edit("--input", image, "--edit_strength", strength)
        assert r"--edit_strength) must lie in (0, 1]" in line
    line = edit("--input", image, "--class_label", CLASSES)
    assert f"--class_label {CLASSES} is not a class of this model" in line
    line = edit("--input", image, "--sampler", "heun")
    assert "--sampler heun needs --evaluations N" in line
    # A grey image is taken as RGB, as the training data loader does.
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "grey.png")
    assert run_script("image_edit", "--model_path", tiny["model"], "--input",
                      tmp_path / "grey.png", "--edit_strength", 0.02, "--seed", 0,
                      "--log_dir", tmp_path / "grey") == 0
