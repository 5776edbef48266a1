"""
Every diffusion/*.pt vector: tables, forward process, posterior, losses, reverse steps, the four
sampling loops, calc_bpd_loop and, for guided_64, classifier guidance. Seeds are set exactly as
the reference run set them, so equal results also mean equal order of random draws.

Tolerances are the conformance README's: float64 tables rtol 1e-10, integers exactly, whole loops
atol 1e-3, and single calls rtol = atol = 1e-4 (thread count and vector unit move a forward pass
by a few 1e-6). A reverse step or a loss is a single call of the denoiser followed by maths
that can amplify its output's rounding (x_0 = x_t / sqrt(abar) - eps * sqrt(1 / abar - 1) is
~156 * eps at t = T-1 of a 1000-step linear schedule, PREVIOUS_X's x_0 is xprev / coef1, ~813x at
t = T-1 of 30 steps, the decoder likelihood divides by tiny variances at t = 0): those results
are also allowed how far the reference's maths moves them when the denoiser's output (and the
classifier gradient) moves within the single-call tolerance. That reach is computed, not tuned:
see _step_reach, _loss_reach and _bpd_terms_and_reach (calc_bpd_loop is T such single calls).
Guided loops get the loop tolerance plus their reach to the classifier gradient, as the README
asks that they be judged against how far the reference moves itself.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import conformance_dir, load_vector
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.nn import mean_flat
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion, create_model

STEP_TOL = dict(rtol=1e-4, atol=1e-4)  # README: single calls
LOOP_TOL = dict(rtol=0, atol=1e-3)  # README: whole sampling loops

CASES = (
    sorted(p.stem for p in (conformance_dir() / "diffusion").glob("*.pt"))
    if conformance_dir() is not None
    else ["direct_prevx_learned_kl"]  # collected so the conformance fixture can skip with a reason
)

GUIDED_CLASSIFIER_FLAGS = dict(
    image_size=64,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="32,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
    classifier_use_fp16=False,
)


pytestmark = pytest.mark.usefixtures("single_thread")


class Case:
    def __init__(self, path):
        self.v = load_vector(path)
        self.diffusion = self._diffusion()
        self.model = create_model(**self.v["mflags"])
        self.model.load_state_dict(self.v["state_dict"], strict=True)
        self.model.eval()
        self.kwargs = dict(self.v["kwargs"])

    def _diffusion(self):
        if self.v["dflags"]:
            return create_gaussian_diffusion(**self.v["dflags"])
        direct = self.v["direct"]
        return gd.GaussianDiffusion(
            betas=gd.get_named_beta_schedule(direct["noise_schedule"], direct["steps"]),
            model_mean_type=gd.ModelMeanType[direct["model_mean_type"]],
            model_var_type=gd.ModelVarType[direct["model_var_type"]],
            loss_type=gd.LossType[direct["loss_type"]],
            rescale_timesteps=direct["rescale_timesteps"],
        )

    def seed(self, offset):
        torch.manual_seed(self.v["seed"] + offset)


@pytest.fixture(scope="module", params=CASES)
def case(request, conformance):
    return Case(conformance / "diffusion" / f"{request.param}.pt")


def assert_dict_close(ours, expected, tol=STEP_TOL):
    assert set(expected) <= set(ours), (sorted(ours), sorted(expected))
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, **tol, msg=lambda m: f"{key}: {m}")


def _call_tol(value):
    """The README's single-call tolerance at each element of `value`."""
    return STEP_TOL["atol"] + STEP_TOL["rtol"] * value.abs()


def assert_within(name, ours, expected, reach=0.0):
    """|ours - expected| <= the single-call tolerance + reach, elementwise."""
    assert ours.shape == expected.shape and ours.dtype == expected.dtype, name
    diff = (ours.double() - expected.double()).abs()
    allowed = _call_tol(expected.double()) + reach
    worst = (diff - allowed).flatten().argmax()
    assert (diff <= allowed).all(), (
        f"{name}: {int((diff > allowed).sum())} elements beyond tolerance; worst off by "
        f"{diff.flatten()[worst].item():.3g} where {allowed.flatten()[worst].item():.3g} is allowed"
    )


class _Memo:
    """
    `fn` (the denoiser, or a cond_fn) remembering its last call: the checks of one reverse step
    call it again and again on the same x_t and t, and eval-mode networks are deterministic.
    """

    def __init__(self, fn):
        self.fn, self.last = fn, None

    def __call__(self, x, ts, **kwargs):
        names = sorted(kwargs)  # model_kwargs here are tensors (y, low_res)
        args = [x, ts, *(kwargs[name] for name in names)]
        if self.last is None or self.last[0] != names or not all(
            torch.equal(a, b) for a, b in zip(args, self.last[1])
        ):
            self.last = (names, [a.clone() for a in args], self.fn(x, ts, **kwargs))
        return self.last[2].clone()


def _gradient_tol(value):
    """
    The single-call tolerance of a classifier gradient. The README's atol 1e-4 is for outputs of
    order one; scale * grad log p(y | x_t) is ~1e-3 (at most 1e-2) here, so its absolute part
    is taken relative to the gradient's largest element.
    """
    return STEP_TOL["atol"] * value.abs().max() + STEP_TOL["rtol"] * value.abs()


def _nudged(fn, signs, split, tol=_call_tol):
    """
    `fn` (the denoiser, or a cond_fn) with its output moved to a corner of its single-call
    tolerance: channels [:split] by signs[0] * tol, the rest (a learned variance) by signs[1] * tol.
    """

    def nudged(*args, **kwargs):
        out = fn(*args, **kwargs)
        sign = torch.full_like(out, float(signs[1]))
        sign[:, :split] = signs[0]
        return out + sign * tol(out)

    return nudged


def _corners(fn, split, halves, tol=_call_tol):
    """`fn` nudged to every corner: +-tol on channels [:split], and on the rest if `halves`."""
    signs = [(a, b) for a in (1, -1) for b in ((1, -1) if halves else (1,))]
    return [_nudged(fn, s, split, tol) for s in signs]


def _denoiser_corners(case, model):
    """`model` (the case's denoiser, or a _Memo of it) nudged to every corner."""
    channels = case.v["x_start"].shape[1]
    return _corners(model, channels, halves=case.model.out_channels > channels)


def _seeded(case, offset, step, *args, **kwargs):
    """step(*args, **kwargs) right after the reference run's torch.manual_seed(seed + offset)."""
    case.seed(offset)
    return step(*args, **kwargs)


def _step_reach(run, ours, variants):
    """
    Per output key, how far a reverse step moves elementwise when its callables' outputs move
    within the single-call tolerance: the largest change over `variants`, argument tuples for
    `run` with each callable nudged to a corner of that tolerance.

    Every output of p_mean_variance, p_sample and ddim_(reverse_)sample is an elementwise
    function of the callables' outputs at the same pixel (the mean half and the variance half of
    the denoiser's channels, and the classifier gradient) and monotone in each of them, clipping
    included, so its extremes over that box are at the corners.
    """
    moved = [run(*args) for args in variants]
    return {
        key: torch.stack([(m[key].double() - value.double()).abs() for m in moved]).amax(0)
        for key, value in ours.items()
    }


def _loss_reach(case, t):
    """
    Per loss key and batch element, how far training_losses moves, to first order, when the
    denoiser's output moves within the single-call tolerance: the sum over the output's elements
    of |d loss / d output| * tol. The losses are means of smooth per-element terms (nothing is
    clipped), so the first order is the reach. It matters for the vb terms, whose KL and decoder
    log-likelihood divide by small variances: up to ~2x the loss's own single-call tolerance.
    """
    d, v = case.diffusion, case.v
    seen = {}

    def denoiser(x, ts, **kwargs):
        if "out" not in seen:  # every call of one training_losses sees the same x_t and t
            seen["out"] = case.model(x, ts, **kwargs).detach().requires_grad_(True)
        return seen["out"]

    def reach(value):
        (grad,) = torch.autograd.grad(
            value.sum(), seen["out"], retain_graph=True, allow_unused=True
        )
        if grad is None:
            return torch.zeros(len(value), dtype=torch.float64)
        return (grad.abs() * _call_tol(seen["out"])).flatten(1).sum(1).double()

    with torch.enable_grad():
        losses = d.training_losses(
            denoiser, v["x_start"], t, model_kwargs=case.kwargs, noise=v["noise"]
        )
        reaches = {key: reach(value) for key, value in losses.items()}
        if "vb" in losses:
            # The hybrid loss detaches the mean half before its vb term, so that only the mse
            # trains it; the term's value still moves with it. Take the term's reach from
            # _vb_terms_bpd on the whole output, with training_losses' rescaling.
            x_t = d.q_sample(v["x_start"], t, noise=v["noise"])
            whole = d._vb_terms_bpd(denoiser, v["x_start"], x_t, t, clip_denoised=False)["output"]
            scale = d.num_timesteps / 1000.0 if d.loss_type == gd.LossType.RESCALED_MSE else 1.0
            torch.testing.assert_close(scale * whole, losses["vb"], rtol=0, atol=0)
            reaches["vb"] = scale * reach(whole)
            reaches["loss"] = reaches["mse"] + reaches["vb"]
    return reaches


def test_tables_and_timestep_map(case):
    d, v = case.diffusion, case.v
    assert d.num_timesteps == v["num_timesteps"]
    for name, table in v["tables"].items():
        ours = getattr(d, name)
        assert ours.dtype == table.numpy().dtype, name
        # README: float64 tables. numpy's log and sqrt are within an ulp on any vector unit.
        torch.testing.assert_close(torch.from_numpy(ours), table, rtol=1e-10, atol=0, msg=name)
    timestep_map = getattr(d, "timestep_map", list(range(d.num_timesteps)))
    assert list(timestep_map) == v["timestep_map"].tolist()


@pytest.mark.parametrize("where", ["edge", "mid"])
def test_single_steps(case, where):
    d, v, kwargs = case.diffusion, case.v, case.kwargs
    model = _Memo(case.model)
    t = v["t"] if where == "edge" else v["t_mid"]
    x_start, noise = v["x_start"], v["noise"]

    x_t = d.q_sample(x_start, t, noise=noise)
    torch.testing.assert_close(x_t, v[f"q_sample_{where}"], **STEP_TOL)
    x_t = v[f"q_sample_{where}"]

    mean, variance, log_variance = d.q_posterior_mean_variance(x_start, x_t, t)
    assert_dict_close(
        dict(mean=mean, variance=variance, log_variance=log_variance), v[f"q_posterior_{where}"]
    )

    losses = d.training_losses(model, x_start, t, model_kwargs=kwargs, noise=noise)
    assert set(losses) == set(v[f"training_losses_{where}"])
    reach = _loss_reach(case, t)
    for key, expected in v[f"training_losses_{where}"].items():
        assert_within(f"training_losses_{where}/{key}", losses[key], expected, reach[key])

    corners = [(m,) for m in _denoiser_corners(case, model)]

    def check(name, run):
        ours, expected = run(model), v[f"{name}_{where}"]
        assert set(expected) <= set(ours), (name, sorted(ours), sorted(expected))
        reach = _step_reach(run, ours, corners)
        for key, value in expected.items():
            assert_within(f"{name}_{where}/{key}", ours[key], value, reach[key])

    with torch.no_grad():
        check("p_mean_variance", lambda m: d.p_mean_variance(m, x_t, t, model_kwargs=kwargs))
        if d.model_mean_type == gd.ModelMeanType.PREVIOUS_X:
            # The x_0 recovery itself, from the reference's own model output (its 'mean'): the
            # same float32 operations on the same inputs, so the single-call tolerance.
            expected = v[f"p_mean_variance_{where}"]
            recovered = d._predict_xstart_from_xprev(x_t=x_t, t=t, xprev=expected["mean"])
            torch.testing.assert_close(recovered.clamp(-1, 1), expected["pred_xstart"], **STEP_TOL)
        check(
            "p_mean_variance_noclip",
            lambda m: d.p_mean_variance(
                m, x_t, t, clip_denoised=False, denoised_fn=lambda x: x * 0.5, model_kwargs=kwargs
            ),
        )
        check("p_sample", lambda m: _seeded(case, 10, d.p_sample, m, x_t, t, model_kwargs=kwargs))
        check(
            "ddim_sample_eta0",
            lambda m: _seeded(case, 11, d.ddim_sample, m, x_t, t, model_kwargs=kwargs),
        )
        check(
            "ddim_sample_eta07",
            lambda m: _seeded(case, 12, d.ddim_sample, m, x_t, t, model_kwargs=kwargs, eta=0.7),
        )
        check(
            "ddim_reverse_sample", lambda m: d.ddim_reverse_sample(m, x_t, t, model_kwargs=kwargs)
        )


def test_sampling_loops(case):
    d, v, model, kwargs = case.diffusion, case.v, case.model, case.kwargs
    shape = tuple(v["x_start"].shape)
    case.seed(20)
    torch.testing.assert_close(d.p_sample_loop(model, shape, model_kwargs=kwargs), v["p_sample_loop"], **LOOP_TOL)
    case.seed(21)
    torch.testing.assert_close(
        d.p_sample_loop(model, shape, noise=v["noise"], model_kwargs=kwargs),
        v["p_sample_loop_given_noise"],
        **LOOP_TOL,
    )
    case.seed(22)
    torch.testing.assert_close(d.ddim_sample_loop(model, shape, model_kwargs=kwargs), v["ddim_sample_loop"], **LOOP_TOL)
    case.seed(23)
    torch.testing.assert_close(
        d.ddim_sample_loop(model, shape, model_kwargs=kwargs, eta=0.5), v["ddim_sample_loop_eta05"], **LOOP_TOL
    )


def test_progressive_loop_yields_every_step(case):
    d, v, model, kwargs = case.diffusion, case.v, case.model, case.kwargs
    shape = tuple(v["x_start"].shape)
    case.seed(22)
    steps = list(d.ddim_sample_loop_progressive(model, shape, model_kwargs=kwargs))
    assert len(steps) == d.num_timesteps
    torch.testing.assert_close(steps[-1]["sample"], v["ddim_sample_loop"], **LOOP_TOL)


def _bpd_terms_and_reach(case):
    """
    calc_bpd_loop's per-step tables ('vb', 'xstart_mse', 'mse', each [N x T]) rebuilt from the
    library's pieces in its order and with its random draws, and how far each term moves when
    the denoiser's output moves within its single-call tolerance.

    Each step is one call of the denoiser; its terms are pixel means of per-pixel functions of
    p_mean_variance's elementwise outputs (with clipping). A pixel's term moves at most as far
    as over the corners of that tolerance (to first order, and exactly through the clip), so a
    term's reach is the pixel mean of those per-pixel maxima. This is where the schedule's first
    step shows: eps = (x_t / sqrt(abar) - x_0) / sqrt(1 / abar - 1) divides x_0's rounding by
    ~0.01 at t = 0 of a 1000-step linear schedule, for the START_X and PREVIOUS_X models.
    """
    d, v, kwargs = case.diffusion, case.v, case.kwargs
    x_start = v["x_start"]
    model = _Memo(case.model)
    corners = _denoiser_corners(case, model)
    tables = {"vb": [], "xstart_mse": [], "mse": []}
    reach = {"vb": [], "xstart_mse": [], "mse": []}
    case.seed(24)
    with torch.no_grad():
        for step in range(d.num_timesteps - 1, -1, -1):
            t = torch.full((len(x_start),), step, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = d.q_sample(x_start, t, noise=noise)
            true_mean, _, true_log_variance = d.q_posterior_mean_variance(x_start, x_t, t)

            def terms(m):
                out = d.p_mean_variance(m, x_t, t, clip_denoised=True, model_kwargs=kwargs)
                if step == 0:
                    log_scales = 0.5 * out["log_variance"]
                    vb = -discretized_gaussian_log_likelihood(
                        x_start, means=out["mean"], log_scales=log_scales
                    )
                else:
                    vb = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
                eps = d._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
                return {
                    "vb": vb / math.log(2.0),
                    "xstart_mse": (out["pred_xstart"] - x_start) ** 2,
                    "mse": (eps - noise) ** 2,
                }

            base = terms(model)
            moved = [terms(c) for c in corners]
            for key in tables:
                tables[key].append(mean_flat(base[key]))
                most = torch.stack([(m[key].double() - base[key].double()).abs() for m in moved])
                reach[key].append(mean_flat(most.amax(0)))
    tables = {key: torch.stack(value, dim=1) for key, value in tables.items()}
    return tables, {key: torch.stack(value, dim=1) for key, value in reach.items()}


def test_calc_bpd_loop(case):
    d, v = case.diffusion, case.v
    case.seed(24)
    out = d.calc_bpd_loop(case.model, v["x_start"], clip_denoised=True, model_kwargs=case.kwargs)
    expected = v["calc_bpd_loop"]
    assert set(out) == set(expected)
    tables, reach = _bpd_terms_and_reach(case)
    for key, table in tables.items():
        # The rebuilt terms are the library's up to float32 summation order (a few ulp).
        torch.testing.assert_close(table, out[key], rtol=2**-20, atol=1e-12, msg=key)
        # Each step is a single call: its tolerance plus the step's reach.
        assert_within(f"calc_bpd_loop/{key}", out[key], expected[key], reach[key])
    assert_within("calc_bpd_loop/prior_bpd", out["prior_bpd"], expected["prior_bpd"])  # no model
    # total_bpd sums the vb row and prior_bpd: it may differ by what those terms differ by,
    # plus each side's float32 rounding of a (T+1)-term sum, at most T * eps32 * sum |terms|.
    terms = (out["vb"] - expected["vb"]).abs().sum(1)
    terms = terms + (out["prior_bpd"] - expected["prior_bpd"]).abs()
    rounding = 2 * d.num_timesteps * 2.0**-23 * (out["vb"].abs().sum(1) + out["prior_bpd"].abs())
    diff = (out["total_bpd"] - expected["total_bpd"]).abs()
    assert (diff <= terms + rounding).all(), (diff.tolist(), (terms + rounding).tolist())


def _guidance(case):
    v = case.v
    classifier = create_classifier(**GUIDED_CLASSIFIER_FLAGS)
    classifier.load_state_dict(v["classifier_state_dict"], strict=True)
    classifier.eval()
    scale = v["classifier_scale"]

    def cond_fn(x, t, y=None):
        # scale * grad_x log p(y | x_t), as the classifier_sample script computes it.
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


@pytest.fixture(scope="module")
def guided_case(conformance):
    return Case(conformance / "diffusion" / "guided_64.pt")


def test_only_guided_64_has_guidance_vectors(conformance):
    # Guards the fixture above: if new guidance vectors appear, they must be tested too.
    with_guidance = [
        name for name in CASES if "classifier_state_dict" in load_vector(conformance / "diffusion" / f"{name}.pt")
    ]
    assert with_guidance == ["guided_64"]


def test_classifier_guidance(guided_case):
    case = guided_case
    v = case.v
    d, kwargs = case.diffusion, case.kwargs
    assert kwargs["y"].tolist() == [3, 7]
    x_t, t = v["q_sample_mid"], v["t_mid"]
    shape = tuple(v["x_start"].shape)
    channels = shape[1]
    guidance = _guidance(case)

    # The reverse steps: the denoiser's two halves and the classifier gradient (another single
    # call) each at the corners of their single-call tolerance.
    model, cond_fn = _Memo(case.model), _Memo(guidance)
    variants = [
        (m, c)
        for m in _denoiser_corners(case, model)
        for c in _corners(cond_fn, channels, False, _gradient_tol)
    ]
    steps = {
        "guided_p_sample": lambda m, c: _seeded(
            case, 32, d.p_sample, m, x_t, t, cond_fn=c, model_kwargs=kwargs
        ),
        "guided_ddim_sample": lambda m, c: _seeded(
            case, 33, d.ddim_sample, m, x_t, t, cond_fn=c, model_kwargs=kwargs, eta=0.3
        ),
    }
    with torch.no_grad():  # cond_fn enables grad for its own backward pass
        for name, run in steps.items():
            ours = run(model, cond_fn)
            reach = _step_reach(run, ours, variants)
            assert set(v[name]) <= set(ours)
            for key, value in v[name].items():
                assert_within(f"{name}/{key}", ours[key], value, reach[key])

    # The loops. The README's whole-loop tolerance covers the denoiser's rounding carried through
    # a loop, as for the unguided loops; guided loops, it says, are to be judged against how far
    # the reference's maths moves itself. So they are also allowed the loop's reach when the
    # classifier gradient moves by its single-call tolerance: the larger elementwise response to
    # the gradient moved by +tol or by -tol at every step.
    loops = {
        "guided_p_sample_loop": lambda c: _seeded(
            case, 34, d.p_sample_loop, case.model, shape, cond_fn=c, model_kwargs=kwargs
        ),
        "guided_ddim_sample_loop": lambda c: _seeded(
            case, 35, d.ddim_sample_loop, case.model, shape, cond_fn=c, model_kwargs=kwargs, eta=0.0
        ),
    }
    with torch.no_grad():
        for name, run in loops.items():
            ours = run(guidance)
            reach = torch.stack(
                [(run(c) - ours).abs() for c in _corners(guidance, channels, False, _gradient_tol)]
            ).amax(0)
            diff = (ours - v[name]).abs()
            allowed = LOOP_TOL["atol"] + reach
            assert (diff <= allowed).all(), (
                f"{name}: off by {diff.max().item():.3g}; "
                f"allowed {LOOP_TOL['atol']} + reach up to {reach.max().item():.3g}"
            )


def test_library_guidance_default_is_the_reference_point(guided_case):
    # make_classifier_cond_fn with its default --guidance_at x_t (what classifier_sample.py
    # builds) reproduces the reference's guided reverse steps: the gradient at x_t, timestep t.
    from guided_diffusion.diffusion.guidance import make_classifier_cond_fn

    case = guided_case
    v = case.v
    d, kwargs = case.diffusion, case.kwargs
    classifier = create_classifier(**GUIDED_CLASSIFIER_FLAGS)
    classifier.load_state_dict(v["classifier_state_dict"], strict=True)
    library = make_classifier_cond_fn(classifier.eval(), v["classifier_scale"])
    assert library.guidance_at == "x_t"
    x_t, t = v["q_sample_mid"], v["t_mid"]
    model, cond_fn = _Memo(case.model), _Memo(library)
    channels = x_t.shape[1]
    variants = [
        (m, c)
        for m in _denoiser_corners(case, model)
        for c in _corners(cond_fn, channels, False, _gradient_tol)
    ]

    def run(m, c):
        return _seeded(case, 32, d.p_sample, m, x_t, t, cond_fn=c, model_kwargs=kwargs)

    with torch.no_grad():
        ours = run(model, cond_fn)
        reach = _step_reach(run, ours, variants)
        for key, value in v["guided_p_sample"].items():
            assert_within(f"guided_p_sample/{key}", ours[key], value, reach[key])
        # The memo wrapper hides cond_fn.guidance_at; unwrapped, the step is the same.
        direct = run(case.model, library)
        assert all(torch.equal(direct[k], ours[k]) for k in ours)
