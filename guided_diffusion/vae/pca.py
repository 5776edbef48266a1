"""
Principal component analysis, k-nearest-neighbour accuracy and a labelled scatter plot, in torch
and matplotlib only (no scikit-learn at run time).

Works on any [N x D] feature matrix: VAE posterior means, classifier or evaluator features.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.files import atomic_write


@dataclass
class PCAResult:
    """
    A fitted PCA, all float64 tensors.

    :param mean: [D] feature means that were subtracted.
    :param components: [K x D] orthonormal principal directions, one per row, by decreasing
        variance. Signs are fixed so that each row's largest-magnitude entry is positive.
    :param explained_variance: [K] variance along each component (sample variance, N - 1).
    :param explained_variance_ratio: [K] fraction of the total variance along each component.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor


def fit_pca(x, n_components=None):
    """
    PCA by a thin SVD of the centred data: X - mean = U S V^T, components = rows of V^T,
    explained variance = S^2 / (N - 1) (Pearson 1901; the same conventions as scikit-learn).

    :param x: [N x D] tensor or array of features, N >= 2.
    :param n_components: how many components to keep (default min(N, D)).
    :return: a :class:`PCAResult`.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise ValueError(f"PCA needs an [N x D] matrix, got shape {tuple(x.shape)}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 samples, got {n}")
    if not torch.isfinite(x).all():
        raise ValueError("PCA input contains NaN or infinite values")
    max_k = min(n, d)
    k = max_k if n_components is None else int(n_components)
    if not 1 <= k <= max_k:
        raise ValueError(f"n_components must be in [1, {max_k}] for {n} samples of {d} features, got {k}")

    mean = x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    # SVD signs are arbitrary; pin them so repeated fits and plots agree.
    pivot = vh.abs().argmax(dim=1)
    signs = torch.sign(vh[torch.arange(vh.shape[0]), pivot])
    signs[signs == 0] = 1.0
    vh = vh * signs[:, None]

    var = s**2 / (n - 1)
    total = var.sum()
    ratio = var / total if total > 0 else torch.zeros_like(var)
    return PCAResult(
        mean=mean,
        components=vh[:k],
        explained_variance=var[:k],
        explained_variance_ratio=ratio[:k],
    )


def transform(pca, x):
    """
    Coordinates of x in the principal basis: (x - mean) @ components^T.

    :param pca: a :class:`PCAResult`.
    :param x: [N x D] tensor or array.
    :return: [N x K] float64 tensor.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[1] != pca.mean.shape[0]:
        raise ValueError(
            f"expected [N x {pca.mean.shape[0]}] features for this PCA, got shape {tuple(x.shape)}"
        )
    return (x - pca.mean) @ pca.components.T


def knn_predict(coords, labels, k=5, chunk_size=1024):
    """
    Leave-one-out k-nearest-neighbour labels: each point is classified by the majority label of
    its k nearest *other* points (Euclidean). A tie goes to the tied class whose member is nearest.

    :param coords: [N x D] features.
    :param labels: [N] integer labels.
    :param k: neighbours, 1 <= k <= N - 1.
    :param chunk_size: rows of the distance matrix held at once (memory O(chunk_size * N)).
    :return: [N] int64 tensor of predicted labels.
    """
    coords = torch.as_tensor(coords).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long)
    n = coords.shape[0]
    if coords.dim() != 2 or labels.shape != (n,):
        raise ValueError(
            f"expected [N x D] coords and [N] labels, got {tuple(coords.shape)} and {tuple(labels.shape)}"
        )
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    _, labels_idx = torch.unique(labels, return_inverse=True)
    classes = torch.unique(labels)
    num_classes = classes.numel()
    preds = []
    for start in range(0, n, chunk_size):
        block = coords[start : start + chunk_size]
        dist = torch.cdist(block, coords)
        rows = torch.arange(block.shape[0])
        dist[rows, rows + start] = float("inf")  # leave the point itself out
        nn_idx = dist.topk(k, dim=1, largest=False).indices  # sorted nearest first
        nn_lab = labels_idx[nn_idx]
        votes = torch.zeros(block.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, nn_lab, torch.ones_like(nn_lab, dtype=torch.float64))
        # Tie-break: a bonus below 1 that is larger for classes met earlier in the neighbour list.
        rank_bonus = (k - torch.arange(k, dtype=torch.float64)) / (k + 1)
        first = torch.zeros(block.shape[0], num_classes, dtype=torch.float64)
        first.scatter_reduce_(1, nn_lab, rank_bonus.expand_as(nn_lab).clone(), reduce="amax")
        preds.append(classes[(votes + first).argmax(dim=1)])
    return torch.cat(preds)


def knn_accuracy(coords, labels, k=5):
    """
    Leave-one-out kNN accuracy (see :func:`knn_predict`): the fraction of points whose label
    matches the majority of their k nearest neighbours. Chance is :func:`majority_rate`.
    """
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long)
    return (knn_predict(coords, labels, k=k) == labels).double().mean().item()


def majority_rate(labels):
    """Accuracy of always guessing the most frequent label: the chance level for kNN."""
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long)
    return torch.unique(labels, return_counts=True)[1].max().item() / labels.numel()


def class_colors(num_classes):
    """
    One RGBA colour per class: matplotlib's tab10 up to 10 classes, tab20 up to 20, beyond that
    evenly spaced hues.
    """
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](i) for i in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](i) for i in range(num_classes)]
    return [colormaps["hsv"](i / num_classes) for i in range(num_classes)]


def plot_embedding(
    coords,
    path,
    *,
    labels=None,
    class_names=None,
    axis_labels=("component 1", "component 2"),
    title=None,
    dpi=120,
):
    """
    Write a PNG scatter of 2-D points, coloured by class with a legend (one colour when unlabelled).

    Uses the Agg canvas directly, so no display and no global pyplot state are involved.

    :param coords: [N x 2] points.
    :param path: output PNG path.
    :param labels: [N] integer labels or None.
    :param class_names: names indexed by label (default: the label numbers).
    :param axis_labels: x and y axis titles (e.g. with the explained variance).
    :param title: figure title.
    :param dpi: resolution; the figure is 7.5 x 6 inches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"plot_embedding needs [N x 2] points, got shape {coords.shape}")
    fig = Figure(figsize=(7.5, 6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = coords.shape[0]
    size = float(np.clip(6000.0 / max(n, 1), 8, 40))
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, color=class_colors(1)[0], alpha=0.7, linewidths=0)
    else:
        labels = np.asarray(labels).astype(np.int64)
        present = np.unique(labels)
        colors = class_colors(len(present))
        for color, lab in zip(colors, present):
            pts = coords[labels == lab]
            name = class_names[lab] if class_names is not None and lab < len(class_names) else str(lab)
            ax.scatter(pts[:, 0], pts[:, 1], s=size, color=color, alpha=0.7, linewidths=0, label=name)
        legend = ax.legend(
            title="class",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            markerscale=max(1.0, 40.0 / size) ** 0.5,
            frameon=False,
            ncol=1 if len(present) <= 20 else 2,
        )
        for handle in legend.legend_handles:
            handle.set_alpha(1.0)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    return path


def embedding_report(
    features,
    out_dir,
    *,
    labels=None,
    class_names=None,
    k=5,
    raw_2d=False,
    title="latent space",
    stem="latent_pca",
):
    """
    Fit a PCA to [N x D] features, write ``<stem>.npz`` and a ``<stem>.png`` scatter, and measure
    leave-one-out kNN accuracy on the plotted 2-D coordinates and on the full features.

    :param features: [N x D] tensor or array (e.g. VAE posterior means), D >= 2.
    :param out_dir: folder for the outputs (created if missing).
    :param labels: [N] integer labels, or None (one colour, no kNN).
    :param class_names: names indexed by label, for the legend.
    :param k: neighbours for the kNN accuracy.
    :param raw_2d: plot the features themselves (needs D == 2) instead of their first two PCs.
    :param title: first line of the plot title.
    :param stem: output file name without extension.
    :return: dict with the npz and png paths, knn_2d, knn_full and chance (None without labels)
        and the explained variance ratios of the first two components.

    The npz holds mean [D], components [K x D], explained_variance [K],
    explained_variance_ratio [K], coords [N x 2] (what the PNG shows), coords_kind ("pca" or
    "latent"), features [N x D], and labels [N] + class_names when labelled.
    """
    features = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if features.dim() != 2 or features.shape[1] < 2:
        raise ValueError(
            f"need [N x D] features with D >= 2 for a 2-D plot, got shape {tuple(features.shape)}"
        )
    if raw_2d and features.shape[1] != 2:
        raise ValueError(f"raw 2-D plotting needs 2-d features, got {features.shape[1]}")
    pca = fit_pca(features)
    ratio = pca.explained_variance_ratio
    if raw_2d:
        coords = features
        axis_labels = ("z[0]", "z[1]")
        kind = "latent"
    else:
        coords = transform(pca, features)[:, :2]
        axis_labels = tuple(
            f"PC{i + 1} ({100 * float(ratio[i]):.1f}% of variance)" for i in range(2)
        )
        kind = "pca"

    result = dict(knn_2d=None, knn_full=None, chance=None, ratio=ratio[:2].tolist())
    lines = [f"{title} ({features.shape[0]} points, {features.shape[1]}-d)"]
    if labels is not None:
        labels = torch.as_tensor(labels).to(torch.long)
        if labels.shape != (features.shape[0],):
            raise ValueError(f"got {tuple(labels.shape)} labels for {features.shape[0]} points")
        result["chance"] = majority_rate(labels)
        if features.shape[0] > k and torch.unique(labels).numel() > 1:
            result["knn_2d"] = knn_accuracy(coords, labels, k=k)
            result["knn_full"] = knn_accuracy(features, labels, k=k)
            full = ""
            if features.shape[1] > 2:
                full = f", {result['knn_full']:.3f} in {features.shape[1]}-D"
            lines.append(
                f"leave-one-out {k}-NN accuracy: {result['knn_2d']:.3f} in 2-D{full} "
                f"(chance {result['chance']:.3f})"
            )

    os.makedirs(out_dir, exist_ok=True)
    arrays = dict(
        mean=pca.mean.float().numpy(),
        components=pca.components.float().numpy(),
        explained_variance=pca.explained_variance.float().numpy(),
        explained_variance_ratio=pca.explained_variance_ratio.float().numpy(),
        coords=coords.float().numpy(),
        coords_kind=np.array(kind),
        features=features.float().numpy(),
    )
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
        if class_names is not None:
            arrays["class_names"] = np.array([str(c) for c in class_names])
    npz_path = os.path.join(out_dir, stem + ".npz")
    # Atomically: a run killed while writing leaves the earlier file or none.
    atomic_write(npz_path, lambda f: np.savez(f, **arrays))
    png_path = plot_embedding(
        coords.numpy(),
        os.path.join(out_dir, stem + ".png"),
        labels=None if labels is None else labels.numpy(),
        class_names=class_names,
        axis_labels=axis_labels,
        title="\n".join(lines),
    )
    result.update(npz=npz_path, png=png_path)
    return result
