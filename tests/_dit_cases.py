"""
The DiT forward-pass cases shared by tests/test_dit.py and tests/data/dit/make_fixtures.py: each
case's configuration and inputs, and the recipe that gives every weight a random value.

Only numpy and the standard library, so the generator can run it beside the official code
(another interpreter, another torch). Weights are drawn rather than stored, so a full DiT-S/2
costs no space: numpy's legacy RandomState stream is frozen, and uniform() is an exact affine map
of its 53-bit integers, so both sides get the same float32 values bit for bit on any machine.
"""

import math

import numpy as np

# Configurations in this project's argument names; `unconditional` cases run the official model
# (which always has a label table) with one class whose embedding is zero, and ours without one.
CASES = {
    "tiny": dict(
        config=dict(image_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                    patch_size=2, num_classes=10, class_dropout_prob=0.1, learn_sigma=True),
        # Fractional timesteps, and label 10: the null class.
        t=[0.0, 411.5, 999.0], y=[3, 10, 0], seed=1,
    ),
    "pixel_rgb_unconditional": dict(
        config=dict(image_size=16, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                    patch_size=4, num_classes=None, class_dropout_prob=0.0, learn_sigma=False),
        t=[5.0, 640.0], y=None, seed=2,
    ),
    "pixel_grey_5_classes": dict(
        config=dict(image_size=16, in_channels=1, hidden_size=48, depth=1, num_heads=3,
                    patch_size=4, num_classes=5, class_dropout_prob=0.0, learn_sigma=True),
        t=[999.0, 1.0], y=[4, 0], seed=3,
    ),
    # The real DiT-S/2 at 256 pixels (32x32x4 latents, 1000 classes, null class at 1000).
    "DiT-S/2": dict(
        config=dict(image_size=32, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                    patch_size=2, num_classes=1000, class_dropout_prob=0.1, learn_sigma=True),
        t=[17.0, 950.0], y=[207, 1000], seed=4,
    ),
}

# The key that holds the fixed positions: never drawn (each side computes its own).
POS_EMBED = "pos_embed"
LABEL_TABLE = "y_embedder.embedding_table.weight"


def random_weights(shapes, seed):
    """
    A random value for every state-dict entry but the positions, so that no zero-initialised
    layer hides a difference: uniform in [-b, b], b = 1/sqrt(fan_in) for matrices and kernels,
    1 for the label table, 0.1 for biases, drawn in sorted-key order from RandomState(seed).

    :param shapes: {key: shape} of the model's state dict.
    :return: {key: float32 ndarray}.
    """
    rng = np.random.RandomState(seed)
    weights = {}
    for key in sorted(shapes):
        if key == POS_EMBED:
            continue
        shape = tuple(shapes[key])
        if key == LABEL_TABLE:
            bound = 1.0
        elif len(shape) >= 2:
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
        else:
            bound = 0.1
        weights[key] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return weights


def inputs(case):
    """(x, t, y) of a case as numpy arrays (y None when unconditional); x ~ uniform(-2, 2)."""
    spec = CASES[case]
    config = spec["config"]
    rng = np.random.RandomState(1000 + spec["seed"])
    side = config["image_size"]
    x = rng.uniform(-2.0, 2.0, size=(len(spec["t"]), config["in_channels"], side, side))
    y = None if spec["y"] is None else np.array(spec["y"], dtype=np.int64)
    return x.astype(np.float32), np.array(spec["t"], dtype=np.float32), y
