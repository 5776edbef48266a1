"""
Checkpoints as safetensors files (https://github.com/huggingface/safetensors): a JSON header and
raw tensor bytes, readable without unpickling anything and by other tools (diffusers, the Hub).

A model or EMA state dict (names -> tensors) is stored as it is, so any safetensors reader sees
the same names as in a .pt file. A checkpoint with more structure (the cGAN's and the VAE's
one-file checkpoints: several state dicts, flags, numbers) is stored as its tensors, each named
by its path ("generator/net.0.weight"), plus the rest of the structure as JSON in the header's
metadata, so that loading gives back the same object torch.load would.

The safetensors package is optional (the `safetensors` or `diffusers` extra); only a
.safetensors path needs it, and without it such a path is refused in one line.
"""

import json
import os
import struct

import numpy as np
import torch

from ..errors import ScriptError

SUFFIX = ".safetensors"
# The metadata entry that holds a nested checkpoint's structure (absent for a plain state dict).
_TREE_KEY = "guided_diffusion.tree"
_INSTALL = (
    "pip install 'guided-diffusion[safetensors]' (or pip install safetensors)"
)


def is_safetensors_path(path):
    """True when the file name ends in .safetensors (how the format is chosen, as in diffusers)."""
    return os.fspath(path).endswith(SUFFIX)


def safetensors_torch(path):
    """
    The safetensors.torch module.

    :param path: the file that needs it (named in the message).
    :raises ScriptError: naming the package and the extra when it is not installed.
    """
    try:
        import safetensors.torch as st
    except ImportError:
        raise ScriptError(
            f"{path} is a safetensors file, which needs the safetensors package: {_INSTALL}"
        ) from None
    return st


# ----------------------------------------------------------------------------- encoding


def encode(obj):
    """
    (tensors, metadata) to write for obj: a flat {name: tensor} dict is stored as is; anything
    else (nested dicts, lists, tuples, numbers, strings, None, numpy arrays) as its tensors named
    by path plus a JSON description of the rest.

    :raises ValueError: for an object safetensors cannot hold (e.g. an arbitrary class).
    """
    if isinstance(obj, dict) and obj and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return _storable(obj), {"format": "pt"}
    tensors = {}
    tree = _encode_node(obj, (), tensors)
    return _storable(tensors), {"format": "pt", _TREE_KEY: json.dumps(tree)}


def _storable(tensors):
    """CPU, contiguous, and no two names sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            # A view of a larger storage, or a second name for the same memory: its own copy.
            whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            if key in seen or not whole:
                tensor = tensor.clone()
            seen.add(key)
        out[name] = tensor
    return out


def _tensor_name(path, tensors):
    name = "/".join(path) or "tensor"
    unique, n = name, 1
    while unique in tensors:  # e.g. {"a/b": x} beside {"a": {"b": y}}
        unique, n = f"{name}#{n}", n + 1
    return unique


def _encode_node(node, path, tensors):
    if isinstance(node, torch.Tensor):
        name = _tensor_name(path, tensors)
        tensors[name] = node
        return {"__tensor__": name}
    if isinstance(node, np.ndarray):
        name = _tensor_name(path, tensors)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(node))
        return {"__ndarray__": name}
    if isinstance(node, np.generic):
        node = node.item()
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict):
        if all(isinstance(k, str) for k in node) and not any(k.startswith("__") for k in node):
            return {k: _encode_node(v, path + (k,), tensors) for k, v in node.items()}
        # Keys that are not strings (an optimizer's parameter indices), kept with their type.
        items = []
        for k, v in node.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise ValueError(
                    f"a key of type {type(k).__name__} cannot be stored in safetensors"
                )
            items.append([k, _encode_node(v, path + (str(k),), tensors)])
        return {"__items__": items}
    if isinstance(node, (list, tuple)):
        values = [_encode_node(v, path + (str(i),), tensors) for i, v in enumerate(node)]
        return {"__tuple__": values} if isinstance(node, tuple) else values
    raise ValueError(
        f"{'/'.join(path) or 'the checkpoint'} is a {type(node).__name__}, which safetensors "
        "cannot hold (tensors, numbers, strings and containers only): save it as .pt"
    )


def decode(tensors, metadata):
    """The object encode() stored: the tensors dict itself, or the nested structure."""
    tree = (metadata or {}).get(_TREE_KEY)
    if tree is None:
        return tensors
    return _decode_node(json.loads(tree), tensors)


def _decode_node(node, tensors):
    if isinstance(node, list):
        return [_decode_node(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy()
    if "__tuple__" in node:
        return tuple(_decode_node(v, tensors) for v in node["__tuple__"])
    if "__items__" in node:
        return {k: _decode_node(v, tensors) for k, v in node["__items__"]}
    return {k: _decode_node(v, tensors) for k, v in node.items()}


# ----------------------------------------------------------------------------- files


def to_bytes(obj, path):
    """The bytes of obj as a safetensors file (path: named when the package is missing)."""
    tensors, metadata = encode(obj)
    return safetensors_torch(path).save(tensors, metadata=metadata)


def from_bytes(data, path):
    """Read a safetensors file's bytes back into the object that was saved."""
    st = safetensors_torch(path)
    tensors = st.load(data)
    return decode(tensors, read_header(data[: 8 + _header_length(data[:8])]).get("__metadata__"))


def load_file(path):
    """Read a local safetensors file (memory-mapped by safetensors) onto the CPU."""
    st = safetensors_torch(path)
    tensors = st.load_file(path, device="cpu")
    with open(path, "rb") as f:
        head = f.read(8)
        header = read_header(head + f.read(_header_length(head)))
    return decode(tensors, header.get("__metadata__"))


def _header_length(first_bytes):
    if len(first_bytes) < 8:
        raise ValueError("shorter than a safetensors header")
    return struct.unpack("<Q", first_bytes[:8])[0]


def read_header(data):
    """The JSON header of a safetensors file's first bytes. :raises ValueError: not one."""
    length = _header_length(data)
    raw = data[8: 8 + length]
    if len(raw) < length:
        raise ValueError("the header is cut short")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("no safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    return header


def looks_like_safetensors(head):
    """True when a file's first bytes look like a safetensors header (for messages)."""
    return len(head) >= 9 and head[8:9] == b"{"


def is_complete(path):
    """
    True when path's header parses and its tensors end exactly where the file does (a file cut
    short by a crash or a full disk fails). Reads the header only; needs no package.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            length = _header_length(head)
            if length > size - 8:
                return False
            header = read_header(head + f.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items()
                if name != "__metadata__"]
        return max(ends, default=0) == size - 8 - length
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
