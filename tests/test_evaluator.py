"""Evaluator metrics against independent computations, the npz reader, and the CLI end to end."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import linalg as scipy_linalg

import guided_diffusion.evaluation.metrics as metrics
from guided_diffusion.evaluation.evaluator import Evaluator, evaluate, image_dtype_warning, main
from guided_diffusion.evaluation.metrics import (
    FIDStatistics,
    ManifoldEstimator,
    frechet_distance,
    inception_score,
    precision_recall,
)
from guided_diffusion.evaluation.npz import NpzArrayStream
from guided_diffusion.cli.main import run_main

from _launch import child_env
from test_inception import he_initialised_model

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- Frechet distance


def random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def psd_sqrt(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_fid_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), random_covariance(rng, 6)
    same = FIDStatistics(mu=mu.copy(), sigma=sigma.copy())
    assert FIDStatistics(mu=mu, sigma=sigma).frechet_distance(same) == 0.0
    # Through sqrtm as well: a tiny shift of the mean only adds its squared norm.
    shifted = frechet_distance(mu, sigma, mu + 1e-3, sigma)
    assert shifted == pytest.approx(6e-6, abs=1e-8)


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    value = frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert value == pytest.approx(expected, rel=1e-10)


def test_fid_of_general_gaussians_matches_symmetric_formula():
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), computed here with eigh only.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = random_covariance(rng, 8), random_covariance(rng, 8)
    root = psd_sqrt(s1)
    cross = np.trace(psd_sqrt(root @ s2 @ root))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Symmetric in its arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def scipy_sqrtm_fid(features1, features2):
    # The reference's formula, written out here: scipy's sqrtm of the non-symmetric product.
    mu1, mu2 = features1.mean(0), features2.mean(0)
    s1, s2 = np.cov(features1, rowvar=False), np.cov(features2, rowvar=False)
    root = scipy_linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def gram_fid(features1, features2):
    # An oracle that needs no matrix root of a covariance: with centred data A (n1 x D) and
    # B (n2 x D), S1 S2 = A^T A B^T B / ((n1 - 1)(n2 - 1)) has the eigenvalues of
    # (A B^T)(A B^T)^T / (...), so tr((S1 S2)^1/2) is the nuclear norm of A B^T over
    # sqrt((n1 - 1)(n2 - 1)). It is exact for any number of samples.
    a, b = features1 - features1.mean(0), features2 - features2.mean(0)
    n1, n2 = len(a), len(b)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = features1.mean(0) - features2.mean(0)
    return float(diff @ diff + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * cross)


def two_feature_sets(seed, samples, dim):
    rng = np.random.default_rng(seed)
    if dim <= 512:
        mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim)
        first = rng.normal(size=(samples, dim)) @ mixing
    else:  # correlated columns at 2048-d cost seconds; scaled ones suffice there
        first = rng.normal(size=(samples, dim)) * rng.uniform(0.5, 2, size=dim)
    second = rng.normal(size=(samples + 3, dim)) * 1.2 + 0.1
    return first, second


def fid_from_features(features1, features2):
    s1, s2 = FIDStatistics.from_features(features1), FIDStatistics.from_features(features2)
    return s1.frechet_distance(s2)


@pytest.mark.parametrize("samples,dim", [(16, 8), (64, 32), (256, 64), (2048, 64)])
def test_fid_matches_scipy_sqrtm_where_well_conditioned(samples, dim):
    first, second = two_feature_sets(samples, samples, dim)
    expected = scipy_sqrtm_fid(first, second)
    assert fid_from_features(first, second) == pytest.approx(expected, rel=1e-6)
    if samples <= 256:  # the oracle's SVD of a samples x samples matrix costs seconds beyond
        assert fid_from_features(first, second) == pytest.approx(gram_fid(first, second), rel=1e-9)


@pytest.mark.parametrize("samples,dim", [(16, 256), (64, 256), (256, 512), (2048, 2048)])
def test_fid_stays_real_with_fewer_samples_than_dimensions(samples, dim):
    # Covariances of rank samples - 1 < dim: the reference's sqrtm check ("Imaginary component")
    # fails on these (48 images at 2048-d in issue 31); the eigenvalue form gives the exact value.
    # 2048 samples at 2048-d are still one short of full rank.
    first, second = two_feature_sets(samples + 1, samples, dim)
    value = fid_from_features(first, second)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(gram_fid(first, second), rel=1e-9)


def test_fid_rejects_a_matrix_that_is_no_covariance_and_bad_shapes():
    with pytest.raises(ValueError, match="first covariance is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="second covariance is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        FIDStatistics.from_features(np.zeros((1, 4)))


def test_statistics_match_numpy():
    features = np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32)
    stats = FIDStatistics.from_features(features)
    np.testing.assert_allclose(stats.mu, features.astype(np.float64).mean(0))
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float64).T))


# ---------------------------------------------------------------- Inception Score


def confident_logits(classes):
    logits = np.full((len(classes), 10), -50.0)
    logits[np.arange(len(classes)), classes] = 50.0
    return logits


def test_inception_score_known_values():
    assert inception_score(np.zeros((7, 10))) == pytest.approx(1.0)
    assert inception_score(confident_logits([3] * 8)) == pytest.approx(1.0)
    # Confident and uniform over 4 classes: exp(log 4).
    assert inception_score(confident_logits([0, 1, 2, 3] * 2)) == pytest.approx(4.0)


def test_inception_score_splits_are_consecutive_and_averaged():
    # First split all one class (score 1), second split 4 classes (score 4): arithmetic mean 2.5.
    logits = confident_logits([5, 5, 5, 5, 0, 1, 2, 3])
    assert inception_score(logits, split_size=4) == pytest.approx(2.5)
    # A last, smaller split counts as one split: [1, 1, 1, 1] | [2 classes] -> (1 + 2) / 2.
    assert inception_score(confident_logits([5, 5, 5, 5, 0, 1]), split_size=4) == pytest.approx(1.5)


def test_inception_score_matches_numpy_formula():
    logits = np.random.default_rng(4).normal(scale=3, size=(30, 12))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for start in range(0, 30, 10):
        part = probs[start : start + 10]
        kl = np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), axis=1).mean()
        scores.append(np.exp(kl))
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-10)


# ---------------------------------------------------------------- precision and recall


def grid(n, offset=0.0):
    xs = np.arange(n, dtype=np.float32) + offset
    return np.stack([xs, np.zeros(n, dtype=np.float32)], axis=1)


def test_radii_are_squared_distance_to_third_neighbour():
    points = np.random.default_rng(5).normal(size=(23, 6)).astype(np.float32)
    dist = ((points[:, None] - points[None]) ** 2).sum(-1)
    expected = np.sort(dist, axis=1)[:, 3]  # column 0 is the point itself
    for rows, cols in [(10000, 10000), (4, 7)]:
        radii = ManifoldEstimator(row_batch_size=rows, col_batch_size=cols).manifold_radii(points)
        assert radii.shape == (23, 1)
        np.testing.assert_allclose(radii[:, 0], expected, rtol=1e-4, atol=1e-4)
    # On a unit grid an interior point's 3rd neighbour is at distance 2 (squared 4).
    assert ManifoldEstimator().manifold_radii(grid(10))[5, 0] == pytest.approx(4.0)


def test_precision_recall_known_answers():
    points = np.random.default_rng(6).normal(size=(40, 8)).astype(np.float32)
    assert precision_recall(points, points.copy()) == (1.0, 1.0)
    assert precision_recall(points, points + 1000.0) == (0.0, 0.0)
    # Samples: a copy of the reference grid plus as many far points. Half the samples are on the
    # reference manifold; every reference point is covered by the copy.
    ref = grid(20)
    samples = np.concatenate([grid(20), grid(20, offset=1000.0)])
    assert precision_recall(ref, samples) == (0.5, 1.0)
    # Swapping roles swaps the answers.
    assert precision_recall(samples, ref) == (1.0, 0.5)
    small_blocks = ManifoldEstimator(row_batch_size=3, col_batch_size=7)
    assert precision_recall(ref, samples, estimator=small_blocks) == (0.5, 1.0)


def test_manifold_evaluate_and_clamp():
    estimator = ManifoldEstimator(row_batch_size=4, col_batch_size=3)
    ref = grid(10)
    radii = estimator.manifold_radii(ref)
    queries = np.array([[2.2, 0.0], [50.0, 0.0], [9.0, 0.5]], dtype=np.float32)
    result = estimator.evaluate(ref, radii, queries)
    assert result["batch_predictions"][:, 0].tolist() == [1, 0, 1]
    assert result["nearest_indices"].tolist() == [2, 9, 9]
    assert result["fraction"] == pytest.approx(2 / 3)
    # Realism of query 0: max over refs of radius / (d^2 + eps); ref 2 at d^2 = 0.04 dominates.
    assert result["max_realism_score"][0] == pytest.approx(4.0 / (0.04 + 1e-5), rel=1e-4)
    clamped = ManifoldEstimator(clamp_to_percentile=50).manifold_radii(ref)
    assert (clamped[radii > np.percentile(radii, 50)] == 0).all()
    with pytest.raises(ValueError, match="more than 3 feature vectors"):
        estimator.manifold_radii(grid(3))


# ---------------------------------------------------------------- npz reading


def test_npz_stream_batches(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, size=(11, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images, extra=np.zeros(2))
    np.savez_compressed(tmp_path / "packed.npz", images)
    np.savez(tmp_path / "fortran.npz", np.asfortranarray(images))
    for name in ("plain", "packed", "fortran"):
        with NpzArrayStream(path=str(tmp_path / f"{name}.npz"), name="arr_0") as stream:
            assert len(stream) == 11 and stream.shape == (11, 4, 5, 3)
            batches = list(stream.batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), images)
    with pytest.raises(ValueError, match="no array named 'arr_9'"):
        NpzArrayStream(path=str(tmp_path / "plain.npz"), name="arr_9")
    (tmp_path / "raw.npy").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="not an .npz file"):
        NpzArrayStream(path=str(tmp_path / "raw.npy"), name="arr_0")


# ---------------------------------------------------------------- Evaluator flow, stub network


class StubFeatures(nn.Module):
    """Cheap deterministic features with the Evaluator's model interface (6-d pool, 5-d spatial)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, images):
        x = images.float() / 255.0
        pool = torch.cat([x.mean(dim=(1, 2)), x.std(dim=(1, 2))], dim=1)
        spatial = x[:, :5, 0, 0]
        return pool, spatial

    def logits(self, pool):
        return pool @ self.fc.weight.t()


def test_evaluate_flow_prints_reference_lines_and_uses_stored_statistics(tmp_path):
    rng = np.random.default_rng(8)
    ref_images = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    sample_images = rng.integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", sample_images)
    evaluator = Evaluator(model=StubFeatures(), batch_size=5, progress=False)
    ref_pool, ref_spatial = evaluator.compute_activations([ref_images])
    # The stored statistics must be the ones used: shift the stored pool mean by a known vector.
    shift = np.full(6, 0.5)
    stored_mu = ref_pool.astype(np.float64).mean(0) + shift
    np.savez(
        tmp_path / "ref.npz",
        arr_0=ref_images,
        mu=stored_mu,
        sigma=np.cov(ref_pool.astype(np.float64).T),
    )
    lines = []
    results = evaluate(
        ref_batch=str(tmp_path / "ref.npz"),
        sample_batch=str(tmp_path / "samples.npz"),
        evaluator=evaluator,
        out=lambda *args: lines.append(" ".join(str(a) for a in args)),
    )
    names = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert lines[:5] == [
        "computing reference batch activations...",
        "computing/reading reference batch statistics...",
        "computing sample batch activations...",
        "computing/reading sample batch statistics...",
        "Computing evaluations...",
    ]
    assert [line.split(":")[0] for line in lines[5:]] == names
    assert [float(line.split(": ")[1]) for line in lines[5:]] == [results[n] for n in names]

    sample_pool, sample_spatial = evaluator.compute_activations([sample_images])
    expected_fid = frechet_distance(
        sample_pool.astype(np.float64).mean(0), np.cov(sample_pool.astype(np.float64).T),
        stored_mu, np.cov(ref_pool.astype(np.float64).T),
    )
    assert results["FID"] == pytest.approx(expected_fid, rel=1e-9)
    # No mu_s/sigma_s stored: sFID comes from the spatial activations.
    expected_sfid = frechet_distance(
        sample_spatial.astype(np.float64).mean(0), np.cov(sample_spatial.astype(np.float64).T),
        ref_spatial.astype(np.float64).mean(0), np.cov(ref_spatial.astype(np.float64).T),
    )
    assert results["sFID"] == pytest.approx(expected_sfid, rel=1e-9)
    assert (results["Precision"], results["Recall"]) == precision_recall(ref_pool, sample_pool)


def test_fid_and_sfid_share_the_frechet_code(tmp_path, monkeypatch):
    dims = []
    real = metrics.frechet_distance

    def recording(mu1, sigma1, mu2, sigma2, **kwargs):
        dims.append(len(np.atleast_1d(mu1)))
        return real(mu1, sigma1, mu2, sigma2, **kwargs)

    monkeypatch.setattr(metrics, "frechet_distance", recording)
    images = np.random.default_rng(9).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images)
    evaluator = Evaluator(model=StubFeatures(), progress=False)
    path = str(tmp_path / "a.npz")
    evaluate(ref_batch=path, sample_batch=path, evaluator=evaluator, out=lambda *a: None)
    assert dims == [6, 5]


# ---------------------------------------------------------------- CLI end to end


def test_cli_self_comparison(tmp_path):
    weights = tmp_path / "inception.pth"
    torch.save(he_initialised_model().state_dict(), weights)
    batch = tmp_path / "batch.npz"
    images = np.random.default_rng(10).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    np.savez(batch, arr_0=images)
    digest = hashlib.sha256(batch.read_bytes()).hexdigest()
    proc = subprocess.run(
        [sys.executable, "evaluations/evaluator.py", str(batch), str(batch),
         "--inception_path", str(weights), "--batch_size", "2", "--device", "cpu"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=child_env(cpu=True),
    )
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert list(values) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert float(values["FID"]) == pytest.approx(0.0, abs=1e-6)
    assert float(values["sFID"]) == pytest.approx(0.0, abs=1e-6)
    assert float(values["Precision"]) == 1.0 and float(values["Recall"]) == 1.0
    assert float(values["Inception Score"]) >= 1.0
    assert hashlib.sha256(batch.read_bytes()).hexdigest() == digest


def exit_status(main, argv):
    """The exit status of a script's main run as the script runs it (run_main)."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    return exc.value.code


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    batch = tmp_path / "batch.npz"
    np.savez(batch, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    proc = subprocess.run(
        [sys.executable, "evaluations/evaluator.py", str(batch), str(batch),
         "--inception_path", str(tmp_path / "absent.pth")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=child_env(cpu=True),
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Inception weights not found" in proc.stderr and "--inception_path" in proc.stderr

    # No flag and nothing in the default places.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    monkeypatch.chdir(tmp_path)
    assert exit_status(main, [str(batch), str(batch)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no Inception weights given" in err

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, wrong)
    assert exit_status(main, [str(batch), str(batch), "--inception_path", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing keys" in err


def test_batches_that_are_not_uint8_images_get_a_warning_naming_the_fix(tmp_path):
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    cases = {
        "uint8": (images, None),
        "unit": (images / 255.0, "float64 values in [0, 1], but the evaluator expects uint8 NHWC "
                                 "images in 0..255: save (x * 255).round().clip(0, 255).astype(np.uint8)"),
        "signed": ((images / 127.5 - 1).astype(np.float32), "float32 values in [-1, 1] (model "
                                                            "outputs?), but the evaluator expects "
                                                            "uint8 NHWC images in 0..255: save "
                                                            "((x + 1) * 127.5)"),
        "wide": (images.astype(np.float32), "float32 values in 0..255, but the evaluator expects"),
        "int64": (images.astype(np.int64), "int64 values in 0..255"),
        "odd": (images * 3.0, "float64 values from 0 to"),
    }
    for name, (array, expected) in cases.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, array)
        message = image_dtype_warning(path)
        if expected is None:
            assert message is None
        else:
            assert message.startswith(f"warning: {path}: arr_0 holds {expected}"), message
            assert "\n" not in message
    # The evaluation warns before computing and still scores the file, as the reference would.
    warnings, lines = [], []
    evaluate(ref_batch=str(tmp_path / "uint8.npz"), sample_batch=str(tmp_path / "unit.npz"),
             evaluator=Evaluator(model=StubFeatures(), progress=False),
             out=lambda *a: lines.append(" ".join(map(str, a))), warn=warnings.append)
    assert len(warnings) == 1 and "unit.npz" in warnings[0] and "FID:" in " ".join(lines)
