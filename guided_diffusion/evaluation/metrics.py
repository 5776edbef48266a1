"""
Sample-quality metrics on feature vectors: Frechet distance (FID, sFID), Inception Score, and the
improved precision and recall of Kynkaanniemi et al. 2019. Pure maths, no network: every function
takes arrays of features, so each can be checked on synthetic inputs.
"""

import numpy as np
import torch


class FIDStatistics:
    """
    Mean and covariance of a set of feature vectors, as stored in the reference batches (``mu``,
    ``sigma`` for pool features; ``mu_s``, ``sigma_s`` for spatial features).

    :param mu: [D] mean.
    :param sigma: [D x D] covariance.
    """

    def __init__(self, *, mu, sigma):
        self.mu = mu
        self.sigma = sigma

    @classmethod
    def from_features(cls, features):
        """
        :param features: [N x D] features, N >= 2.
        :return: their statistics, with the unbiased (N - 1) covariance like ``np.cov``.
        """
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(
                "need at least 2 feature vectors to estimate a covariance, "
                f"got shape {features.shape}"
            )
        return cls(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False))

    def frechet_distance(self, other, eps=1e-6):
        """
        :param other: another FIDStatistics of the same dimension.
        :param eps: diagonal offset used when the covariance product is too singular for sqrtm.
        :return: the Frechet distance between the two Gaussians (see ``frechet_distance``).
        """
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps=1e-6):
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The last trace is taken from the eigenvalues of the symmetric positive semi-definite matrix
    sigma1^(1/2) sigma2 sigma1^(1/2), which are those of sigma1 sigma2 (see
    ``trace_sqrt_product``). It is real and finite for any pair of covariances, rank-deficient
    ones included, so fewer samples than feature dimensions (48 images at 2048-d pool features)
    still give a distance.

    :param eps: accepted for the reference's signature; this form never needs its diagonal offset.
    :return: the distance as a Python float.
    :raises ValueError: on shape mismatch, or a matrix that is not a covariance (an eigenvalue
        clearly below zero).
    """
    del eps  # the reference retried sqrtm with eps on both diagonals; nothing here can fail so.
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different shapes: {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    if not diff.any() and np.array_equal(sigma1, sigma2):
        # deviation from reference: identical statistics give exactly 0 without any matrix root,
        # which on 2048-d covariances costs seconds and returns rounding noise.
        return 0.0
    cross = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


# A covariance eigenvalue below -NEGATIVE_TOLERANCE * (largest |eigenvalue|) is not rounding: the
# matrix is no covariance. float32-stored covariances round at ~1e-7 relative, far inside this.
NEGATIVE_TOLERANCE = 1e-4


def _rank_tolerance(values, dim):
    # The usual numerical-rank threshold (as in numpy.linalg.matrix_rank): eigenvalues below it
    # are rounding of an exact zero.
    return max(float(np.max(np.abs(values))), 0.0) * dim * np.finfo(np.float64).eps


def trace_sqrt_product(sigma1, sigma2):
    """
    tr((sigma1 sigma2)^(1/2)) for two symmetric positive semi-definite matrices.

    With sigma1 = V diag(w) V^T and R = V diag(sqrt(w)), the matrix R^T sigma2 R is symmetric
    positive semi-definite and similar (on the range of sigma1) to sigma1 sigma2, so the wanted
    trace is the sum of the square roots of its eigenvalues. Only eigenvectors of sigma1 above
    the numerical-rank threshold are kept, and eigenvalues below it are zeros: the square roots
    of rounding noise would otherwise add up over the ~2000 null directions of a covariance of a
    few dozen samples.

    :raises ValueError: when either matrix has an eigenvalue clearly below zero.
    """
    # deviation from reference: the reference takes scipy.linalg.sqrtm of the non-symmetric
    # product sigma1 sigma2 and stops with "Imaginary component" when its diagonal is complex
    # beyond 1e-3, which rank-deficient covariances (fewer samples than dimensions) trip; the
    # symmetric eigenvalue form here is real by construction, agrees with sqrtm to ~1e-14 where
    # sqrtm is well conditioned, and takes 4 s instead of sqrtm's 16 s at 2048-d on one CPU core.
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    dim = sigma1.shape[0]
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    _check_semi_definite(values, "first covariance")
    keep = values > _rank_tolerance(values, dim)
    if not keep.any():
        return 0.0
    root = vectors[:, keep] * np.sqrt(values[keep])
    product = root.T @ sigma2 @ root
    product_values = np.linalg.eigvalsh((product + product.T) / 2)
    # Negative only if sigma2 is (on the range of sigma1): this saves a third eigendecomposition.
    _check_semi_definite(product_values, "second covariance")
    product_values = product_values[product_values > _rank_tolerance(product_values, dim)]
    return float(np.sqrt(product_values).sum())


def _check_semi_definite(values, which):
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    if values.size and values.min() < -NEGATIVE_TOLERANCE * scale:
        raise ValueError(
            f"the {which} is not positive semi-definite "
            f"(eigenvalue {values.min():.3g}, largest {scale:.3g})"
        )


def inception_score(logits, *, split_size=5000):
    """
    Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), computed on consecutive
    chunks of ``split_size`` samples and averaged (the reference prints the mean only; 50k samples
    give its 10 splits of 5000). p(y) is each chunk's mean prediction.

    :param logits: [N x K] logits; the softmax is taken here.
    :param split_size: samples per split; the last split may be smaller.
    :return: the mean score over splits, as a Python float.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected [N x K] logits with N > 0, got shape {tuple(logits.shape)}")
    # deviation from reference: softmax and logs in float64 (the reference uses float32), and
    # p * log p is taken as 0 where p underflows to 0 instead of producing NaN.
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))


def pairwise_squared_distances(u, v):
    """
    :param u: [N x D] tensor.
    :param v: [M x D] tensor.
    :return: [N x M] squared Euclidean distances, clamped at 0 against rounding.
    """
    norm_u = (u * u).sum(dim=1, keepdim=True)
    norm_v = (v * v).sum(dim=1, keepdim=True).t()
    return (norm_u - 2 * (u @ v.t()) + norm_v).clamp_min(0)


class ManifoldEstimator:
    """
    k-NN manifold estimate of a feature set (Kynkaanniemi et al. 2019, sec. 2): each point carries a
    hypersphere whose squared radius is the squared distance to its k-th nearest neighbour (the
    point itself counts as the 0-th), and a feature lies on the manifold if it falls in any sphere.

    All distances are computed in blocks of ``row_batch_size`` x ``col_batch_size``, so memory stays
    bounded for 50k x 10k feature sets.

    :param row_batch_size: rows per distance block.
    :param col_batch_size: columns per distance block.
    :param nhood_sizes: neighbourhood sizes k; one precision/recall value each.
    :param clamp_to_percentile: if set, radii above this percentile are set to 0 (sphere pruned).
    :param eps: added to distances in the realism score.
    :param device: torch device for the distance computations.
    """

    def __init__(
        self,
        *,
        row_batch_size=10000,
        col_batch_size=10000,
        nhood_sizes=(3,),
        clamp_to_percentile=None,
        eps=1e-5,
        device="cpu",
    ):
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps
        self.device = torch.device(device)

    def _blocks(self, n, size):
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def _tensor(self, array):
        # deviation from reference: distances in float32 throughout; the reference tries float16
        # first on its TF graph, which shifts borderline points and so precision/recall in the
        # third decimal.
        return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=self.device)

    def manifold_radii(self, features):
        """
        :param features: [N x D] features.
        :return: float32 [N x len(nhood_sizes)] squared radii.
        """
        features = self._tensor(features)
        n = len(features)
        keep = max(self.nhood_sizes) + 1
        if n < keep:
            raise ValueError(
                f"need more than {keep - 1} feature vectors for k={keep - 1} nearest "
                f"neighbours, got {n}"
            )
        radii = torch.empty(n, len(self.nhood_sizes), dtype=torch.float32)
        for r0, r1 in self._blocks(n, self.row_batch_size):
            # Keep only the running `keep` smallest distances per row instead of a full
            # [rows x N] distance matrix; the k-th smallest is the same.
            nearest = None
            for c0, c1 in self._blocks(n, self.col_batch_size):
                dist = pairwise_squared_distances(features[r0:r1], features[c0:c1])
                if nearest is not None:
                    dist = torch.cat([nearest, dist], dim=1)
                nearest = dist.topk(min(keep, dist.shape[1]), dim=1, largest=False).values
            radii[r0:r1] = nearest[:, self.nhood_sizes].cpu()
        radii = radii.numpy()
        if self.clamp_to_percentile is not None:
            max_radii = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_radii] = 0
        return radii

    def evaluate(self, features, radii, eval_features):
        """
        Which of ``eval_features`` lie on the manifold of (``features``, ``radii``).

        :return: dict with "fraction" (of points inside, averaged over the k), "batch_predictions"
            ([M x K] int32 0/1), "max_realism_score" ([M], Kynkaanniemi et al. eq. 3 with the
            first k) and "nearest_indices" ([M] index of the nearest reference feature).
        """
        features, eval_features = self._tensor(features), self._tensor(eval_features)
        radii_t = torch.as_tensor(radii, dtype=torch.float32, device=self.device)
        m = len(eval_features)
        inside = torch.zeros(m, radii_t.shape[1], dtype=torch.bool)
        realism = torch.zeros(m, dtype=torch.float32)
        nearest = torch.zeros(m, dtype=torch.int64)
        for r0, r1 in self._blocks(m, self.row_batch_size):
            best_realism = best_dist = best_index = None
            for c0, c1 in self._blocks(len(features), self.col_batch_size):
                dist = pairwise_squared_distances(eval_features[r0:r1], features[c0:c1])
                inside[r0:r1] |= (dist[:, :, None] <= radii_t[None, c0:c1]).any(dim=1).cpu()
                score = (radii_t[None, c0:c1, 0] / (dist + self.eps)).max(dim=1).values
                block_dist, block_index = dist.min(dim=1)
                if best_dist is None:
                    best_realism, best_dist, best_index = score, block_dist, block_index + c0
                else:
                    best_realism = torch.maximum(best_realism, score)
                    closer = block_dist < best_dist
                    best_index = torch.where(closer, block_index + c0, best_index)
                    best_dist = torch.where(closer, block_dist, best_dist)
            realism[r0:r1], nearest[r0:r1] = best_realism.cpu(), best_index.cpu()
        predictions = inside.numpy().astype(np.int32)
        return {
            "fraction": float(predictions.mean()),
            "batch_predictions": predictions,
            "max_realism_score": realism.numpy(),
            "nearest_indices": nearest.numpy(),
        }

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        """
        Precision and recall in one pass over the distance blocks.

        :param features_1: [N1 x D] reference features.
        :param radii_1: [N1 x K] their radii.
        :param features_2: [N2 x D] sample features.
        :param radii_2: [N2 x K] their radii.
        :return: (precision, recall), float64 arrays of length K: the fraction of samples inside the
            reference manifold, and of reference points inside the sample manifold.
        """
        features_1, features_2 = self._tensor(features_1), self._tensor(features_2)
        radii_1 = torch.as_tensor(radii_1, dtype=torch.float32, device=self.device)
        radii_2 = torch.as_tensor(radii_2, dtype=torch.float32, device=self.device)
        ref_covered = torch.zeros(len(features_1), radii_2.shape[1], dtype=torch.bool)
        sample_covered = torch.zeros(len(features_2), radii_1.shape[1], dtype=torch.bool)
        for r0, r1 in self._blocks(len(features_1), self.row_batch_size):
            for c0, c1 in self._blocks(len(features_2), self.col_batch_size):
                dist = pairwise_squared_distances(features_1[r0:r1], features_2[c0:c1])[..., None]
                ref_covered[r0:r1] |= (dist <= radii_2[None, c0:c1]).any(dim=1).cpu()
                sample_covered[c0:c1] |= (dist <= radii_1[r0:r1, None]).any(dim=0).cpu()
        precision = sample_covered.numpy().astype(np.float64).mean(axis=0)
        recall = ref_covered.numpy().astype(np.float64).mean(axis=0)
        return precision, recall


def precision_recall(ref_features, sample_features, *, estimator=None):
    """
    Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-2) with k=3 by default.

    :param ref_features: [N1 x D] reference features.
    :param sample_features: [N2 x D] sample features.
    :param estimator: a ManifoldEstimator; the reference settings when None.
    :return: (precision, recall) for the first neighbourhood size, as Python floats.
    """
    estimator = estimator or ManifoldEstimator()
    radii_ref = estimator.manifold_radii(ref_features)
    radii_sample = estimator.manifold_radii(sample_features)
    precision, recall = estimator.evaluate_pr(
        ref_features, radii_ref, sample_features, radii_sample
    )
    return float(precision[0]), float(recall[0])
