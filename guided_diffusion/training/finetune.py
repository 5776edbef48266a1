"""
Fine-tuning a released (or any) diffusion checkpoint with --init_checkpoint: the label embedding
is the one tensor whose shape depends on the data (its rows are the classes, plus the null class
of classifier-free guidance), so it is the one tensor that may be re-initialised:

- --init_num_classes K: the model is built for K classes and its whole label embedding keeps its
  fresh initialisation (also when the checkpoint is unconditional and has none);
- --init_add_null_class True: the checkpoint's rows are kept and the null-class row (index
  num_classes, needed by --class_dropout_prob > 0) keeps its fresh initialisation.

The label table's key is the network's (guided_diffusion/networks.py: label_key; the UNet's
label_emb.weight, a DiT's y_embedder.embedding_table.weight). Every other tensor loads strictly; a checkpoint that still does not fit gets the usual message
naming the flags to change.
"""

import torch

from ..errors import ScriptError

__all__ = ["LABEL_KEY", "check_init_flags", "adapt_label_embedding"]

LABEL_KEY = "label_emb.weight"


def check_init_flags(*, init_checkpoint, init_num_classes, init_add_null_class, class_cond,
                     class_dropout_prob):
    """
    Refuse --init_* flags that cannot work, before anything is built.

    :raises ValueError: naming the flag to pass or drop.
    """
    given = [f for f, on in (("--init_num_classes", init_num_classes),
                             ("--init_add_null_class", init_add_null_class)) if on]
    if given and not init_checkpoint:
        raise ValueError(
            f"{' and '.join(given)} adapt{'s' if len(given) == 1 else ''} the checkpoint of "
            "--init_checkpoint: pass --init_checkpoint FILE"
        )
    if init_num_classes < 0:
        raise ValueError(f"--init_num_classes must be >= 1 (0 = keep the checkpoint's), got "
                         f"{init_num_classes}")
    if (init_num_classes or init_add_null_class) and not class_cond:
        raise ValueError(
            "--init_num_classes and --init_add_null_class give the model a label embedding: pass "
            "--class_cond True"
        )
    if init_add_null_class and not class_dropout_prob > 0:
        raise ValueError(
            "--init_add_null_class True adds the null class of classifier-free guidance, which "
            "training uses only with --class_dropout_prob > 0: pass --class_dropout_prob 0.1"
        )


def adapt_label_embedding(state, fresh, *, path, init_num_classes=0, init_add_null_class=False,
                          key=LABEL_KEY):
    """
    Replace the label embedding of a checkpoint's state dict as the flags ask.

    :param state: the checkpoint's state dict (not modified).
    :param fresh: the model's own, freshly initialised state dict (gives the new rows).
    :param path: the checkpoint's name, for messages.
    :param init_num_classes: > 0: the whole embedding is re-initialised (fresh has K rows).
    :param init_add_null_class: keep the checkpoint's rows and add the null-class row.
    :param key: the label table's state-dict key (the network's label_key).
    :return: (state dict to load, [one line per re-initialised tensor]).
    :raises ScriptError: when the checkpoint's embedding cannot be adapted.
    """
    if not (init_num_classes or init_add_null_class):
        return state, []
    if key not in fresh:
        raise ScriptError("--init_num_classes / --init_add_null_class need a class-conditional "
                          "model: pass --class_cond True")
    new = fresh[key]
    rows = new.shape[0]
    adapted = dict(state)
    if init_num_classes:
        adapted[key] = new.detach().clone().to(_device_of(state, new))
        had = state.get(key)
        was = f"the checkpoint's {had.shape[0]} rows dropped" if had is not None else \
            "the checkpoint had none"
        null = " plus the null class" if rows == init_num_classes + 1 else ""
        return adapted, [f"{key}: all {rows} rows ({init_num_classes} classes{null}; {was})"]
    old = state.get(key)
    if old is None:
        raise ScriptError(
            f"checkpoint {path} is unconditional (no {key}): --init_add_null_class needs "
            "its class rows; pass --init_num_classes K to start a new label embedding instead"
        )
    if old.shape[1:] != new.shape[1:]:
        raise ScriptError(
            f"checkpoint {path} has {key} of width {old.shape[1]}, the model {new.shape[1]}: "
            "check --num_channels (--dit_model for a DiT)"
        )
    if old.shape[0] == rows:
        raise ScriptError(
            f"checkpoint {path} already has {rows} label rows, the null class included: drop "
            "--init_add_null_class True"
        )
    if old.shape[0] != rows - 1:
        raise ScriptError(
            f"checkpoint {path} has {old.shape[0]} classes, the model {rows - 1}: pass "
            f"--num_classes {old.shape[0]}, or --init_num_classes {rows - 1} to re-initialise "
            "the label embedding"
        )
    adapted[key] = torch.cat([old, new[rows - 1 :].detach().to(old.device, old.dtype)])
    return adapted, [f"{key}: row {rows - 1} (the null class of classifier-free guidance; "
                     f"rows 0..{rows - 2} loaded)"]


def _device_of(state, default):
    for value in state.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return default.device
