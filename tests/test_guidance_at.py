"""
--guidance_at (GD#51): where ancestral sampling takes the classifier gradient. The default, x_t, is
the reference's (tests/test_diffusion_conformance.py checks it against the reference's vectors);
mean takes it at the predicted mean of x_{t-1} with timestep t - 1. A classifier whose gradient is
known in closed form shows which point and which timestep were used.
"""

import pytest
import torch

from guided_diffusion.cli.main import run_main
from guided_diffusion.diffusion.guidance import check_guidance_at, make_classifier_cond_fn
from guided_diffusion.script_util import create_gaussian_diffusion

STEPS = 10
DIRECTION = torch.linspace(-1.0, 1.0, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)[:1]


class LinearClassifier(torch.nn.Module):
    """
    Two classes, logits (c(t) <a, x>, 0) with c(t) = 1 + t/10. log p(y=0 | x) = -softplus(-l),
    so grad_x log p(y=0 | x) = sigmoid(-l) c(t) a: it depends on the point (through the sigmoid)
    and on the timestep, and is written out by hand in ``expected_gradient``.
    """

    def __init__(self):
        super().__init__()
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t.clone())
        scale = 1 + t.float() / 10
        first = scale * (x * DIRECTION).flatten(1).sum(1)
        return torch.stack([first, torch.zeros_like(first)], dim=1)


def expected_gradient(x, t, classifier_scale):
    scale = (1 + t.double() / 10).view(-1, 1, 1, 1)
    logit = scale.flatten() * (x.double() * DIRECTION).flatten(1).sum(1)
    return classifier_scale * torch.sigmoid(-logit).view(-1, 1, 1, 1) * scale * DIRECTION


def eps_model(x, t, **kwargs):
    return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)


def setup(respacing=""):
    diffusion = create_gaussian_diffusion(steps=STEPS, noise_schedule="cosine", timestep_respacing=respacing)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return diffusion, x, {"y": torch.zeros(2, dtype=torch.long)}


@pytest.mark.parametrize("at", ["x_t", "mean"])
@pytest.mark.parametrize("step", [6, 0])
def test_condition_mean_takes_the_gradient_where_asked(at, step):
    diffusion, x, kwargs = setup()
    classifier = LinearClassifier()
    cond_fn = make_classifier_cond_fn(classifier, 2.5, guidance_at=at)
    t = torch.full((2,), step, dtype=torch.long)
    out = diffusion.p_mean_variance(eps_model, x, t, model_kwargs=kwargs)
    shifted = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs=kwargs)
    point, point_t = (x, t) if at == "x_t" else (out["mean"], (t - 1).clamp(min=0))
    expected = out["mean"].double() + out["variance"].double() * expected_gradient(point, point_t, 2.5)
    torch.testing.assert_close(shifted.double(), expected, rtol=1e-5, atol=1e-6)
    assert classifier.seen_t[-1].tolist() == point_t.tolist()
    if at == "mean":  # the two points really differ here
        other = out["mean"].double() + out["variance"].double() * expected_gradient(x, t, 2.5)
        assert (shifted.double() - other).abs().max() > 1e-4


def test_mean_on_a_spaced_process_uses_the_previous_spaced_step():
    # 10 steps spaced to 5 (timesteps 0, 2, 4, 7, 9, the reference's space_timesteps): at spaced
    # step 3 (timestep 7) the mean is of x at spaced step 2, timestep 4, which the classifier
    # must see.
    diffusion, x, kwargs = setup("5")
    assert list(diffusion.timestep_map) == [0, 2, 4, 7, 9]
    classifier = LinearClassifier()
    cond_fn = make_classifier_cond_fn(classifier, 1.0, guidance_at="mean")
    t = torch.full((2,), 3, dtype=torch.long)
    out = diffusion.p_mean_variance(eps_model, x, t, model_kwargs=kwargs)
    shifted = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs=kwargs)
    assert classifier.seen_t[-1].tolist() == [4, 4]
    point_t = torch.full((2,), 4)
    expected = out["mean"].double() + out["variance"].double() * expected_gradient(out["mean"], point_t, 1.0)
    torch.testing.assert_close(shifted.double(), expected, rtol=1e-5, atol=1e-6)


def test_default_is_the_reference_and_plain_cond_fns_keep_x_t():
    diffusion, x, kwargs = setup()
    t = torch.full((2,), 5, dtype=torch.long)
    classifier = LinearClassifier()
    default = make_classifier_cond_fn(classifier, 1.0)
    assert default.guidance_at == "x_t"

    def plain(x_in, t_in, y=None):  # a user's own cond_fn, without the attribute
        return default(x_in, t_in, y=y)

    out = diffusion.p_mean_variance(eps_model, x, t, model_kwargs=kwargs)
    a = diffusion.condition_mean(default, out, x, t, model_kwargs=kwargs)
    b = diffusion.condition_mean(plain, out, x, t, model_kwargs=kwargs)
    assert torch.equal(a, b)
    assert [s.tolist() for s in classifier.seen_t] == [[5, 5], [5, 5]]


def test_bad_values_are_refused_in_one_line():
    for bad in ("", "middle", "X_T"):
        with pytest.raises(ValueError, match="unknown --guidance_at"):
            check_guidance_at(bad)
        with pytest.raises(ValueError, match="unknown --guidance_at"):
            make_classifier_cond_fn(LinearClassifier(), 1.0, guidance_at=bad)
    with pytest.raises(ValueError, match="--guidance_at mean shifts the mean of ancestral"):
        check_guidance_at("mean", "ddim")
    check_guidance_at("x_t", "ddim")
    check_guidance_at("mean", "ddpm")


@pytest.mark.parametrize("flags,message", [
    (["--guidance_at", "middle"], "error: unknown --guidance_at 'middle'"),
    (["--guidance_at", ""], "error: unknown --guidance_at ''"),
    (["--guidance_at", "mean", "--use_ddim", "True"], "error: --guidance_at mean shifts the mean"),
    (["--guidance_at"], "expected one argument"),
])
def test_classifier_sample_refuses_bad_guidance_at_before_any_work(tmp_path, capsys, flags, message):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "classifier_sample.py"
    spec = importlib.util.spec_from_file_location("classifier_sample_under_test", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # No model or classifier file: the flag must be refused before they are looked for.
    argv = ["--model_path", str(tmp_path / "none.pt"), "--classifier_path", str(tmp_path / "c.pt"),
            "--log_dir", str(tmp_path / "log"), *flags]
    with pytest.raises(SystemExit) as stop:
        run_main(script.main, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len([l for l in err if "error" in l]) == 1
    assert not (tmp_path / "log").exists()
