"""
How far an FID of K samples is from the FID of 50,000, measured on generated Gaussian features
(no network): the proxy FID of training (--fid_samples, docs/training.md) is such an FID.

The samples come from the reference distribution itself (true FID 0) or from one shifted by a
fixed mean offset, N(0, D) with D diagonal (FID is invariant under rotations of the features, so
a diagonal covariance loses nothing), compared with the exact reference statistics, as the
reference batches' mu/sigma of a whole training set nearly are. The bias of the finite-sample
FID is reported relative to tr(D) (a reference batch's np.trace(sigma) gives a user's own scale).

tr((S D)^(1/2)) is taken from the eigenvalues of the symmetric D^(1/2) S D^(1/2), which is exact
for this symmetric positive semi-definite product and needs no sqrtm.

    python benchmarks/fid_sample_bias.py            # one JSON line per (spectrum, K)
"""

import argparse
import json

import numpy as np


def spectrum(kind, dim):
    j = np.arange(1, dim + 1, dtype=np.float64)
    values = {"flat": np.ones(dim), "1/j": 1.0 / j, "1/j^2": 1.0 / j ** 2}[kind]
    return values / values.sum()  # tr(D) = 1: biases are in units of tr(sigma)


def fid_to_exact(features, mu, variances):
    mean = features.mean(axis=0)
    centred = features - mean
    cov = centred.T @ centred / (len(features) - 1)
    root = np.sqrt(variances)
    inner = root[:, None] * cov * root[None, :]
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum()
    diff = mean - mu
    return float(diff @ diff + np.trace(cov) + variances.sum() - 2 * trace_sqrt)


def main(argv=None):
    parser = argparse.ArgumentParser(description="FID bias at K samples on Gaussian features")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--counts", default="1000,2000,5000,10000,50000")
    parser.add_argument("--spectra", default="flat,1/j,1/j^2")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--offset", type=float, default=0.0,
                        help="squared mean offset of the samples, in units of tr(sigma)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    for kind in args.spectra.split(","):
        variances = spectrum(kind, args.dim)
        mu = np.zeros(args.dim)
        shift = np.zeros(args.dim)
        shift[0] = np.sqrt(args.offset)
        for count in map(int, args.counts.split(",")):
            values = []
            for _ in range(args.trials if count < 50000 else 1):
                x = rng.standard_normal((count, args.dim)) * np.sqrt(variances) + shift
                values.append(fid_to_exact(x, mu, variances))
            print(json.dumps({"spectrum": kind, "K": count, "true_fid": args.offset,
                              "fid_over_trace": float(np.mean(values)),
                              "k_times_bias_over_trace": float((np.mean(values) - args.offset)
                                                               * count)}), flush=True)


if __name__ == "__main__":
    main()
