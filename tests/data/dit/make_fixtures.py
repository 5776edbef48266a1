"""
Write the DiT oracle files of this folder by running the official facebookresearch/DiT models.py
(see README.md for the exact commit and command). Needs torch, numpy and timm; it imports the
official module from the checkout given on the command line and nothing from this project but
tests/_dit_cases.py.

    python tests/data/dit/make_fixtures.py --dit /path/to/DiT [--commit SHA] --out tests/data/dit
"""

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for _dit_cases
import _dit_cases  # noqa: E402

# The manifest: every named size at 256 pixels (32x32x4 latents) as the released models are
# built, DiT-XL/2 at 512 pixels (64x64x4), and one model without the null-class row.
LATENT = dict(in_channels=4, num_classes=1000, learn_sigma=True)
MANIFEST_MODELS = [(f"{name}@256", name, dict(input_size=32, class_dropout_prob=0.1, **LATENT))
                   for name in ("DiT-S/2 DiT-S/4 DiT-S/8 DiT-B/2 DiT-B/4 DiT-B/8 DiT-L/2 DiT-L/4 "
                                "DiT-L/8 DiT-XL/2 DiT-XL/4 DiT-XL/8").split()]
MANIFEST_MODELS += [
    ("DiT-XL/2@512", "DiT-XL/2", dict(input_size=64, class_dropout_prob=0.1, **LATENT)),
    ("DiT-S/8@256,no-null-class", "DiT-S/8", dict(input_size=32, class_dropout_prob=0.0, **LATENT)),
]


def official_model(models, config):
    """The official DiT for a case's configuration (an unconditional case gets 1 class)."""
    return models.DiT(
        input_size=config["image_size"], patch_size=config["patch_size"],
        in_channels=config["in_channels"], hidden_size=config["hidden_size"],
        depth=config["depth"], num_heads=config["num_heads"],
        class_dropout_prob=config["class_dropout_prob"],
        num_classes=config["num_classes"] or 1, learn_sigma=config["learn_sigma"],
    )


def manifest(models):
    entries = {}
    for label, name, kwargs in MANIFEST_MODELS:
        with torch.device("meta"):
            model = models.DiT_models[name](**kwargs)
        entries[label] = dict(
            model=name, kwargs=kwargs,
            state_dict=[[key, list(value.shape)] for key, value in model.state_dict().items()],
            parameters=sum(p.numel() for p in model.parameters()),
            trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        )
    return entries


def init_fingerprint(models, config, seed=0):
    """Per key: float64 sum, sum of squares and first values of a fresh official model."""
    torch.manual_seed(seed)
    model = official_model(models, config)
    return {key: dict(sum=float(v.double().sum()), sum_sq=float(v.double().square().sum()),
                      first=v.flatten()[:4].tolist())
            for key, v in model.state_dict().items()}


def forward_case(models, case):
    config = _dit_cases.CASES[case]["config"]
    model = official_model(models, config).eval()
    shapes = {key: list(v.shape) for key, v in model.state_dict().items()}
    weights = _dit_cases.random_weights(shapes, _dit_cases.CASES[case]["seed"])
    state = {key: torch.from_numpy(v) for key, v in weights.items()}
    x, t, y = _dit_cases.inputs(case)
    if y is None:
        # One class whose embedding is zero: c is the timestep embedding alone.
        state[_dit_cases.LABEL_TABLE] = torch.zeros_like(model.y_embedder.embedding_table.weight)
        y = np.zeros(len(t), dtype=np.int64)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == [_dit_cases.POS_EMBED] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
    return out.numpy(), model.pos_embed.detach().numpy()[0], float(np.float64(x).sum())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dit", required=True, help="a checkout of facebookresearch/DiT")
    parser.add_argument("--commit", help="the checkout's commit (when it is not a git work tree)")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    sys.path.insert(0, args.dit)
    import models  # the official models.py

    torch.set_num_threads(1)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = args.commit or subprocess.run(["git", "-C", args.dit, "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    import timm

    provenance = dict(dit_commit=commit, torch=torch.__version__, timm=timm.__version__,
                      numpy=np.__version__)
    (out / "official_manifest.json").write_text(
        json.dumps(dict(provenance=provenance, models=manifest(models)), separators=(",", ":")))

    arrays, sums = {}, {}
    for case in _dit_cases.CASES:
        output, pos_embed, x_sum = forward_case(models, case)
        arrays[f"{case}/out"] = output
        if case != "DiT-S/2":  # (256 x 384 values; its forward already uses our positions)
            arrays[f"{case}/pos_embed"] = pos_embed
        sums[case] = x_sum
    np.savez_compressed(out / "official_forward.npz", **arrays)
    fingerprint = init_fingerprint(models, _dit_cases.CASES["tiny"]["config"])
    (out / "official_forward.json").write_text(json.dumps(
        dict(provenance=provenance, x_sums=sums, tiny_init_seed0=fingerprint), indent=1))


if __name__ == "__main__":
    main()
