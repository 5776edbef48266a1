"""PCA, kNN accuracy and the scatter plot of guided_diffusion.vae.pca, checked against numpy."""

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.vae import (
    embedding_report,
    fit_pca,
    knn_accuracy,
    majority_rate,
    plot_embedding,
    transform,
)


def _numpy_pca(x):
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / (x.shape[0] - 1)
    return vt, var, var / var.sum()


@pytest.mark.parametrize("shape", [(200, 7), (6, 15)])
def test_pca_matches_numpy_svd(shape):
    rng = np.random.default_rng(1)
    # Correlated columns with distinct variances so the components are well defined.
    x = rng.normal(size=shape) @ np.diag(np.linspace(3, 0.5, shape[1])) @ rng.normal(size=(shape[1], shape[1]))
    vt, var, ratio = _numpy_pca(x)
    k = min(shape) - 1
    pca = fit_pca(torch.tensor(x), n_components=k)
    np.testing.assert_allclose(pca.mean.numpy(), x.mean(axis=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pca.explained_variance.numpy(), var[:k], rtol=1e-8)
    np.testing.assert_allclose(pca.explained_variance_ratio.numpy(), ratio[:k], rtol=1e-8)
    # Components agree up to the sign of each row.
    dots = np.sum(pca.components.numpy() * vt[:k], axis=1)
    np.testing.assert_allclose(np.abs(dots), 1.0, rtol=1e-8)
    # Each row's largest-magnitude entry is made positive.
    comps = pca.components.numpy()
    assert np.all(comps[np.arange(k), np.abs(comps).argmax(axis=1)] > 0)


def test_pca_matches_sklearn_when_available():
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 5)) @ rng.normal(size=(5, 5))
    ours = fit_pca(x, n_components=3)
    ref = decomposition.PCA(n_components=3).fit(x)
    np.testing.assert_allclose(ours.explained_variance.numpy(), ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(
        np.abs(transform(ours, x).numpy()), np.abs(ref.transform(x)), rtol=1e-6, atol=1e-8
    )


def test_transform_projects_centred_data_and_full_basis_is_lossless():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 4)) + np.array([10.0, -2.0, 0.0, 5.0])
    pca = fit_pca(x)
    coords = transform(pca, x).numpy()
    # The coordinates are uncorrelated with variances equal to the explained variances.
    np.testing.assert_allclose(np.cov(coords, rowvar=False), np.diag(pca.explained_variance.numpy()), atol=1e-10)
    back = coords @ pca.components.numpy() + pca.mean.numpy()
    np.testing.assert_allclose(back, x, atol=1e-10)
    assert abs(pca.explained_variance_ratio.sum().item() - 1.0) < 1e-12


def test_pca_rejects_bad_input():
    with pytest.raises(ValueError, match="n_components"):
        fit_pca(np.zeros((10, 3)), n_components=4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_pca(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fit_pca(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\[N x 3\]"):
        transform(fit_pca(np.random.rand(5, 3)), np.random.rand(5, 2))


def _loo_knn_bruteforce(x, y, k):
    correct = 0
    for i in range(len(x)):
        d = np.linalg.norm(x - x[i], axis=1)
        d[i] = np.inf
        nearest = y[np.argsort(d, kind="stable")[:k]]
        correct += np.bincount(nearest).argmax() == y[i]
    return correct / len(x)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_matches_bruteforce_leave_one_out(k):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(150, 3))
    y = (x[:, 0] + 0.8 * rng.normal(size=150) > 0).astype(np.int64)  # two noisy classes, odd k: no ties
    assert knn_accuracy(x, y, k=k) == pytest.approx(_loo_knn_bruteforce(x, y, k))


def test_knn_separated_clusters_and_leave_one_out():
    x = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    y = np.array([0, 0, 0, 1, 1, 1])
    assert knn_accuracy(x, y, k=2) == 1.0
    # Leave-one-out: a lone point of class 2 is classified by its neighbours, never by itself.
    x2 = np.vstack([x, [[5.0]]])
    y2 = np.append(y, 2)
    assert knn_accuracy(x2, y2, k=1) == pytest.approx(6 / 7)
    assert majority_rate(np.array([0, 0, 1, 2])) == 0.5
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(x, y, k=6)


def test_knn_tie_goes_to_the_nearer_class():
    # Point 0 at the origin: neighbours at 1 (class 5) and 2 (class 3), k=2 is a 1-1 tie.
    x = np.array([[0.0], [1.0], [-2.0]])
    y = np.array([5, 5, 3])
    assert knn_accuracy(x, y, k=2) == pytest.approx(2 / 3)  # point 0 -> class 5 (correct)


def _colour_present(img, rgb, tol=12, min_pixels=20):
    diff = np.abs(img[..., :3].astype(int) - np.array(rgb)[None, None, :]).max(axis=-1)
    return int((diff <= tol).sum()) >= min_pixels


def _tab10_rgb():
    from matplotlib import colormaps

    return [tuple(int(round(255 * c)) for c in colormaps["tab10"](i)[:3]) for i in range(10)]


def test_plot_has_one_distinct_colour_per_class(tmp_path):
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(10), 40)
    centres = np.stack([np.cos(np.arange(10)), np.sin(np.arange(10))], axis=1) * 10
    coords = centres[labels] + rng.normal(size=(400, 2))
    path = plot_embedding(coords, str(tmp_path / "p.png"), labels=labels, axis_labels=("a", "b"), title="t")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (720, 900, 3)  # 7.5 x 6 inches at 120 dpi
    palette = _tab10_rgb()
    assert len(set(palette)) == 10
    # The legend markers are drawn opaque, so every class colour appears exactly.
    assert all(_colour_present(img, rgb, tol=4) for rgb in palette)


def test_plot_without_labels_uses_one_colour(tmp_path):
    coords = np.random.default_rng(6).normal(size=(300, 2))
    path = plot_embedding(coords, str(tmp_path / "p.png"))
    img = np.asarray(Image.open(path).convert("RGB"))
    palette = _tab10_rgb()
    assert _colour_present(img, palette[0], tol=40)
    assert not any(_colour_present(img, rgb, tol=20, min_pixels=5) for rgb in palette[1:4])


def test_embedding_report_writes_npz_and_png(tmp_path):
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 30)
    feats = rng.normal(size=(90, 6)) * 0.3
    feats[:, 0] += labels * 4  # classes separate along one direction
    res = embedding_report(feats, str(tmp_path), labels=labels, class_names=["a", "b", "c"])
    assert res["knn_2d"] == 1.0 and res["chance"] == pytest.approx(1 / 3)
    with np.load(res["npz"]) as npz:
        assert npz["coords"].shape == (90, 2) and npz["components"].shape == (6, 6)
        assert str(npz["coords_kind"]) == "pca"
        np.testing.assert_array_equal(npz["labels"], labels)
        assert list(npz["class_names"]) == ["a", "b", "c"]
        np.testing.assert_allclose(npz["explained_variance_ratio"].sum(), 1.0, rtol=1e-5)
    unlabelled = embedding_report(feats[:, :2], str(tmp_path / "u"), raw_2d=True)
    assert unlabelled["knn_2d"] is None
    with np.load(unlabelled["npz"]) as npz:
        assert str(npz["coords_kind"]) == "latent" and "labels" not in npz
        np.testing.assert_allclose(npz["coords"], feats[:, :2], rtol=1e-6)
    with pytest.raises(ValueError, match="D >= 2"):
        embedding_report(feats[:, :1], str(tmp_path))
