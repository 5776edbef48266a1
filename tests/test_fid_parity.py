"""
The evaluator against the two PyTorch FID tools the field trusts, with one shared weight file.

One random InceptionV3 weight file in pytorch-fid's layout (the key names of
``pt_inception-2015-12-05-6726825d.pth``), its BatchNorm running statistics calibrated on images
so no layer is dead or saturated, is loaded by

* our evaluator network (``guided_diffusion.evaluation.inception``),
* torch-fidelity's ``inception-v3-compat`` extractor (``feature_extractor_weights_path``), and
* pytorch-fid's FID InceptionV3 (its weight download replaced by the local file).

The same images, at 299, 64 and 256 px, go through all three. torch-fidelity implements the TF
graph's input path (TF1 bilinear resize, (x - 128) / 128) like ours, so pool features, FID and IS
must agree to 1e-3 relative. pytorch-fid defines the input differently (x / 255, torch's
half-pixel bilinear resize, 2x - 1), so its numbers differ from ours; fed that same input
(``preprocessing="pytorch-fid"``) our network must match it to 1e-3 as well. The definitions are
written out in docs/evaluator.md; the figures in docs/results.md come from running this file as a
script.

This needs torchvision, which does not import beside the CPU torch of CI, so it runs only in a
separate environment with both tools installed (docs/testing.md):

    PYTHONPATH=$PWD /work/venv-oracle/bin/python -m pytest -q tests/test_fid_parity.py
    PYTHONPATH=$PWD /work/venv-oracle/bin/python tests/test_fid_parity.py   # prints the figures

No network access: the only weights are the random file written here.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.evaluation.inception import InceptionV3, load_inception
from guided_diffusion.evaluation.metrics import FIDStatistics, inception_score

REASON = "needs torchvision (pytorch-fid, torch-fidelity), which does not import beside the CPU torch in CI"


def _oracles_import():
    if any(importlib.util.find_spec(m) is None for m in ("torchvision", "torch_fidelity", "pytorch_fid")):
        return False
    try:
        import pytorch_fid.inception  # noqa: F401  (imports torchvision)
        import torch_fidelity  # noqa: F401
    except Exception:  # a torchvision built for another torch fails in several ways
        return False
    return True


pytestmark = pytest.mark.skipif(not _oracles_import(), reason=REASON)

SIZES = (299, 64, 256)
# Images per set; two sets per size. Small because a CPU forward at 299 px costs seconds an image;
# the FID of two sets of 8 (covariances of rank 7 in 2048-d) is as well defined as any.
PER_SET = 8
RTOL = 1e-3


# ------------------------------------------------------------------ weights and images


def make_images(count, size, seed, contrast):
    """Smooth random colour fields plus fine noise, uint8 NHWC: structure at every scale."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 5, 5, generator=g)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    fine = torch.randn(count, 3, size, size, generator=g) * 0.25
    shift = torch.randn(count, 3, 1, 1, generator=g) * 0.3
    x = 127.5 + 55 * contrast * (field + fine + shift)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def write_calibrated_weights(path, seed=0):
    """
    A random network whose activations are O(1) everywhere: He-initialised convolutions, then each
    BatchNorm's running mean/variance set to the batch statistics of its input on calibration
    images (one train-mode pass with cumulative averaging), so in eval mode every layer normalises
    its input. The softmax weights are scaled so the logits spread over a few units across images
    (an Inception Score well above 1 and far from its maximum).
    """
    torch.manual_seed(seed)
    model = InceptionV3()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
            nn.init.normal_(module.weight, 1.0, 0.1)
            nn.init.normal_(module.bias, 0.0, 0.1)
    calibration = make_images(8, 299, seed=1000 + seed, contrast=1.2)
    model.train()
    with torch.no_grad():
        pool, _ = model(calibration)
    model.eval()
    nn.init.normal_(model.fc.weight, 0.0, 1.0)
    nn.init.zeros_(model.fc.bias)
    with torch.no_grad():
        spread = (pool @ model.fc.weight.t()).std(dim=0).mean()
        model.fc.weight.mul_(3.0 / spread)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    torch.save(model.state_dict(), path)
    return path


# ------------------------------------------------------------------ the three implementations


def ours(weights, images, preprocessing="tf1"):
    model = load_inception(str(weights), preprocessing=preprocessing)
    with torch.no_grad():
        pool, _ = model(images)
        return pool.double().numpy(), model.logits(pool).double().numpy()


def torch_fidelity_features(weights, images):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(weights),
    )
    with torch.no_grad():
        # torch-fidelity takes uint8 NCHW.
        pool, logits = extractor(images.permute(0, 3, 1, 2).contiguous())
    return pool.double().numpy(), logits.double().numpy()


def torch_fidelity_fid(pool_a, pool_b):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(torch.from_numpy(p)) for p in (pool_a, pool_b)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def torch_fidelity_isc(logits, splits):
    from torch_fidelity.metric_isc import isc_features_to_metric

    # shuffle=False: torch-fidelity's default permutes the samples (seed 2020) before splitting.
    result = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
    return result["inception_score_mean"]


def pytorch_fid_features(weights, images):
    import pytorch_fid.inception as pfi

    # pytorch-fid downloads its FID weights inside fid_inception_v3(); hand it the local file.
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: torch.load(weights, weights_only=True)
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        pfi.load_state_dict_from_url = original
    with torch.no_grad():
        # pytorch-fid takes float NCHW in [0, 1] (ToTensor of the image files).
        x = images.permute(0, 3, 1, 2).float() / 255
        (pool,) = model(x)
    return pool.flatten(1).double().numpy()


def pytorch_fid_fid(pool_a, pool_b):
    """pytorch-fid's own Frechet distance, or the error it stops with."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    stats = [(p.mean(0), np.cov(p, rowvar=False)) for p in (pool_a, pool_b)]
    try:
        return float(calculate_frechet_distance(*stats[0], *stats[1]))
    except ValueError as exc:  # "Imaginary component ..." on rank-deficient covariances
        return f"error: {exc}"


def fid(pool_a, pool_b):
    return FIDStatistics.from_features(pool_a).frechet_distance(FIDStatistics.from_features(pool_b))


def relative(a, b):
    """Largest difference relative to the largest magnitude (arrays) or to |b| (numbers)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------ figures


def figures(weights, size):
    sets = [make_images(PER_SET, size, seed=s, contrast=c) for s, c in ((1, 1.0), (2, 1.6))]
    mine = [ours(weights, x) for x in sets]
    theirs = [torch_fidelity_features(weights, x) for x in sets]
    mine_pf = [ours(weights, x, preprocessing="pytorch-fid") for x in sets]
    pf = [pytorch_fid_features(weights, x) for x in sets]
    logits = np.concatenate([mine[0][1], mine[1][1]])
    tf_logits = np.concatenate([theirs[0][1], theirs[1][1]])
    n = len(logits)
    return {
        "size": size,
        "images": n,
        "pool_rel_torch_fidelity": max(relative(m[0], t[0]) for m, t in zip(mine, theirs)),
        "fid_ours": fid(mine[0][0], mine[1][0]),
        "fid_torch_fidelity": torch_fidelity_fid(theirs[0][0], theirs[1][0]),
        # Ours: consecutive splits of split_size samples in file order (the reference: 5000,
        # i.e. 10 splits for 50k). torch-fidelity: isc_splits equal chunks, after a shuffle by
        # default. Same numbers for split_size = N / isc_splits without its shuffle.
        "is_ours_1": inception_score(logits, split_size=n),
        "is_torch_fidelity_1": torch_fidelity_isc(tf_logits, splits=1),
        "is_ours_4": inception_score(logits, split_size=n // 4),
        "is_torch_fidelity_4": torch_fidelity_isc(tf_logits, splits=4),
        "pool_rel_pytorch_fid_vs_ours_tf1": max(relative(m[0], p) for m, p in zip(mine, pf)),
        "pool_rel_pytorch_fid_vs_ours_pf": max(relative(m[0], p) for m, p in zip(mine_pf, pf)),
        "fid_ours_pytorch_fid_input": fid(mine_pf[0][0], mine_pf[1][0]),
        "fid_pytorch_fid_features": fid(pf[0], pf[1]),
        "fid_pytorch_fid_own": pytorch_fid_fid(pf[0], pf[1]),
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_calibrated_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture(scope="module", params=SIZES)
def result(request, weights):
    row = figures(weights, request.param)
    print("\n" + format_row(row))  # the figures of docs/results.md (run with -s)
    return row


def format_row(row):
    return " ".join(f"{k}={v:.7g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def test_weights_are_not_degenerate(weights):
    pool, logits = ours(weights, make_images(PER_SET, 64, seed=3, contrast=1.0))
    varying = pool.std(axis=0) > 1e-3 * pool.std(axis=0).max()
    assert varying.mean() > 0.9  # features move with the image
    score = inception_score(logits)
    assert 1.5 < score < PER_SET  # predictions neither uniform nor one class per image


def test_matches_torch_fidelity_inception_v3_compat(result):
    assert result["pool_rel_torch_fidelity"] < RTOL
    assert result["fid_ours"] == pytest.approx(result["fid_torch_fidelity"], rel=RTOL)
    assert result["is_ours_1"] == pytest.approx(result["is_torch_fidelity_1"], rel=RTOL)
    assert result["is_ours_4"] == pytest.approx(result["is_torch_fidelity_4"], rel=RTOL)


def test_matches_pytorch_fid_when_fed_its_input_definition(result):
    # Our network with pytorch-fid's scaling and resize is pytorch-fid's network.
    assert result["pool_rel_pytorch_fid_vs_ours_pf"] < RTOL
    assert result["fid_ours_pytorch_fid_input"] == pytest.approx(
        result["fid_pytorch_fid_features"], rel=RTOL
    )
    # ... and the definitions really differ: the scale alone at 299 px, scale and resize below.
    assert result["pool_rel_pytorch_fid_vs_ours_tf1"] > 10 * RTOL


class _UInt8Images(torch.utils.data.Dataset):
    """NHWC uint8 images as torch-fidelity's inputs: uint8 CHW tensors."""

    def __init__(self, images):
        self.images = images.permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_torch_fidelity_calculate_metrics_end_to_end(weights):
    # Its public entry point, not only its building blocks, at 64 px.
    import torch_fidelity

    a, b = (make_images(PER_SET, 64, seed=s, contrast=c) for s, c in ((1, 1.0), (2, 1.6)))
    metrics = torch_fidelity.calculate_metrics(
        input1=_UInt8Images(a), input2=_UInt8Images(b), cuda=False, isc=True, fid=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        samples_shuffle=False, isc_splits=2, cache=False, verbose=False, batch_size=PER_SET,
    )
    (pool_a, logits_a), (pool_b, _) = ours(weights, a), ours(weights, b)
    print(f"\ncalculate_metrics at 64 px: FID {metrics['frechet_inception_distance']:.7g} "
          f"(ours {fid(pool_a, pool_b):.7g}), IS of the first set, 2 splits "
          f"{metrics['inception_score_mean']:.7g} "
          f"(ours {inception_score(logits_a, split_size=PER_SET // 2):.7g})")
    assert metrics["frechet_inception_distance"] == pytest.approx(fid(pool_a, pool_b), rel=RTOL)
    assert metrics["inception_score_mean"] == pytest.approx(
        inception_score(logits_a, split_size=PER_SET // 2), rel=RTOL
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_calibrated_weights(Path(tmp) / "random_inception.pth")
        for size in SIZES:
            print(format_row(figures(path, size)), flush=True)
