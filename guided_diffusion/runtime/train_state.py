"""
What a checkpoint needs beyond weights and optimizer moments for a resumed run to be the run that
was interrupted: every rank's random-number streams (torch CPU and CUDA, numpy, `random`) and the
position of every rank's data streams (epoch, seed and offset, see resumable_data).

For the diffusion and classifier scripts this goes into one extra file per checkpoint,
``stateNNNNNN.pt``, beside the reference's files (which stay plain state dicts), written before
the model file, which is written last and marks the checkpoint complete. The cGAN and VAE keep
their one-file checkpoints and carry the same dict under the key "train_state".

Layout (tensors and plain containers only, so torch.load(weights_only=True) reads it)::

    {"format": "guided_diffusion.train_state/1", "step": N, "world_size": W,
     "shared": {...},                     # rank 0's values that are equal on every rank
     "settings": {"--lr": 1e-4, ...},     # the flags a resumed run may change (newer files)
     "ranks": [{"rng": {"torch": uint8 tensor, "cuda": uint8 tensor or None,
                        "numpy": {...}, "random": {...}},
                "data": {"train": {...position...} or None, ...}}, ...]}   # one per rank
"""

import os
import random

import numpy as np
import torch

from . import checkpoints
from .. import dist_util, logger

STATE_FORMAT = "guided_diffusion.train_state/1"
STATE_PREFIX = "state"


def capture_rng():
    """
    This process's random-number generator states.

    :return: a dict of tensors and plain values (CUDA: the current device's generator, or None
        without CUDA).
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    cuda = None
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "random": {
            "version": py_state[0],
            "internal": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }


def restore_rng(state):
    """Set this process's generators to a state from capture_rng()."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["random"]
    random.setstate(
        (py_state["version"], tuple(int(x) for x in py_state["internal"]), py_state["gauss_next"])
    )


def _stream_state(stream):
    get = getattr(stream, "state_dict", None)
    return get() if callable(get) else None


def gather(step, streams=None, shared=None, settings=None):
    """
    Collect the resume state of every rank on rank 0 (a collective: every rank calls it).

    :param step: the checkpoint's step.
    :param streams: {name: data stream or None}; streams with a state_dict() have their position
        saved.
    :param shared: values equal on every rank (e.g. the fp16 loss scale), taken from rank 0.
    :param settings: the run's flags that a resumed run may change ({"--lr": 1e-4, ...}), so
        that it can say what it changed; plain values.
    :return: the state dict on rank 0, None on the other ranks.
    """
    local = {
        "rng": capture_rng(),
        "data": {name: _stream_state(s) for name, s in (streams or {}).items()},
    }
    ranks = dist_util.gather_objects(local)
    if ranks is None:
        return None
    state = {
        "format": STATE_FORMAT,
        "step": int(step),
        "world_size": len(ranks),
        "shared": dict(shared or {}),
        "ranks": ranks,
    }
    if settings:
        state["settings"] = dict(settings)
    return state


def state_path(folder, step):
    """The stateNNNNNN.pt file of a step in a folder."""
    return os.path.join(folder, f"{STATE_PREFIX}{step:06d}.pt")


def load_beside(model_checkpoint, step):
    """
    The stateNNNNNN.pt written with a modelNNNNNN.pt, or None (with a warning) when there is
    none: a checkpoint from before exact resume, or from the reference.

    :raises ValueError: when the file exists but is unreadable or not a state file.
    """
    path = state_path(os.path.dirname(os.fspath(model_checkpoint)), step)
    if not os.path.exists(path):
        logger.warn(
            f"warning: no {os.path.basename(path)} beside {model_checkpoint} (a checkpoint "
            "written without the training state): the random-number streams and the data order "
            "restart, so the resumed run will not repeat the interrupted one exactly"
        )
        return None
    state = checkpoints.load_checkpoint(path, map_location="cpu")
    check_format(state, path)
    logger.log(f"loading RNG and data positions from {path}")
    return state


def from_checkpoint(checkpoint, path):
    """
    The "train_state" entry of a one-file checkpoint (cGAN, VAE), or None with a warning when it
    has none (written before exact resume).
    """
    state = checkpoint.get("train_state")
    if state is None:
        logger.warn(
            f"warning: {path} has no training state (written before exact resume): the "
            "random-number streams and the data order restart"
        )
    else:
        check_format(state, path)
    return state


def check_format(state, path):
    """:raises ValueError: unless state is a training-state dict."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training-state file (stateNNNNNN.pt)")


def restore(state, streams=None, source="the checkpoint"):
    """
    Put this rank's random-number streams and data positions back as they were saved.

    Call it right before the first step, after everything that draws random numbers while
    setting up (model initialisation, seeding). A state written by another number of ranks, or a
    stream that does not fit its saved position, restarts with a warning.

    :param state: a dict from gather() (or None: nothing to restore).
    :param streams: {name: data stream} as given to gather().
    :param source: what the state came from, for the warnings.
    :return: the shared values (an empty dict when nothing was restored).
    """
    if state is None:
        return {}
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    if state["world_size"] != world:
        logger.warn(
            f"warning: {source} was written by {state['world_size']} ranks and this run has "
            f"{world}: the "
            "random-number streams and the data order restart"
        )
        return dict(state.get("shared", {}))
    mine = state["ranks"][rank]
    saved_data = mine.get("data", {})
    for name, stream in (streams or {}).items():
        if stream is None:  # e.g. no validation data in this run
            continue
        saved = saved_data.get(name)
        if not callable(getattr(stream, "load_state_dict", None)):
            logger.warn(
                f"warning: the {name} data stream cannot be repositioned: its order restarts"
            )
            continue
        if saved is None:
            logger.warn(
                f"warning: {source} has no position for the {name} data: its order restarts"
            )
            continue
        try:
            stream.load_state_dict(saved)
        except ValueError as exc:
            logger.warn(f"warning: {exc}: the {name} data order restarts")
    restore_rng(mine["rng"])
    return dict(state.get("shared", {}))


def loss_scale(mp_trainer):
    """The fp16 trainer's log2 loss scale as a float (a plain number or a one-element tensor)."""
    return float(mp_trainer.lg_loss_scale)


def set_loss_scale(mp_trainer, value):
    """Set the fp16 trainer's log2 loss scale, in place when it is kept as a tensor."""
    current = mp_trainer.lg_loss_scale
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        mp_trainer.lg_loss_scale = float(value)
