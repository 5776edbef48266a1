"""
What a denoising network must provide for the rest of the package to train it, sample it,
fine-tune it, run it in half precision and explain a checkpoint that does not fit it.

A network family subclasses DenoisingNetwork (an nn.Module that adds no parameters, so state
dicts and initial weights are those of the class alone) and provides:

- forward(x, timesteps, y=None, **kwargs): x is [N x in_channels x H x W], timesteps a 1-D
  tensor of N (possibly fractional) steps; y an [N] int64 tensor of labels, given if and only if
  the network is class-conditional, the null class of classifier-free guidance being label
  `num_classes` (the last row of the label table); the output is [N x out_channels x H x W] with
  out_channels = in_channels, or 2 * in_channels with learned variances (the prediction first,
  then the variance values), as diffusion/outputs.py reads it. Extra keywords (a
  super-resolution model's low_res) come from the training batch's conditioning dict.
- in_channels, out_channels: attributes with those meanings (SuperResModel's in_channels counts
  its doubled input).
- dtype: the dtype the torso computes in; convert_to_fp16(), convert_to_bf16() and
  convert_to_fp32() cast the torso (the layers that are safe in half precision: the
  conditioning path, norms and output head stay float32) and set it. The mixed-precision
  trainer takes float32 master copies before calling them (fp16_util, training/mixed_precision).
- label_key: the state-dict key of the label table (one row per class, plus the null class with
  class_dropout_prob > 0), or None for a family without labels. It is the one tensor whose shape
  depends on the data, so fine-tuning (training/finetune.py) may re-initialise it and the
  mismatch hints read --num_classes and --class_dropout_prob off it.
- arch: the --arch value that builds the family (script_util.create_model's one switch), and
  signature_prefixes: state-dict key prefixes found in this family's checkpoints and no other's,
  so a checkpoint of another family is named as such (cli/hints.py).
- layout_flags(shapes): the flags read off a checkpoint's {key: shape} that rebuild its
  layout (e.g. --dit_model for a DiT); {} where shapes alone do not tell.

See ARCHITECTURE.md ("Where to add: a network") for the files a new family touches.
"""

import torch.nn as nn

# --arch value -> the family's class, in the order the classes were defined (registration in
# __init_subclass__: a subclass that keeps its parent's arch, SuperResModel, is not a new one).
ARCHITECTURES = {}


class DenoisingNetwork(nn.Module):
    """The base of every denoising network (see the module docstring for the contract)."""

    arch = ""
    label_key = None
    signature_prefixes = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "arch" in cls.__dict__ and cls.arch and cls.arch not in ARCHITECTURES:
            ARCHITECTURES[cls.arch] = cls

    def forward(self, x, timesteps, y=None, **kwargs):
        raise NotImplementedError

    def convert_to_fp16(self):
        raise NotImplementedError

    def convert_to_bf16(self):
        raise NotImplementedError

    def convert_to_fp32(self):
        raise NotImplementedError

    @classmethod
    def layout_flags(cls, shapes, like=None):
        """
        :param shapes: {state-dict key: shape tuple}.
        :param like: a built network of this family, for choices the shapes do not show.
        :return: {flag: value}.
        """
        return {}

    def label_embedding(self):
        """The nn.Embedding holding label_key, or None for an unconditional network."""
        if self.label_key is None:
            return None
        path = self.label_key.rsplit(".", 1)[0]
        try:
            return self.get_submodule(path)
        except AttributeError:
            return None


def label_key_of(model):
    """The label table's state-dict key of any network ("label_emb.weight" for others)."""
    return getattr(model, "label_key", None) or "label_emb.weight"


def label_embedding_of(model):
    """The label nn.Embedding of a network, or None (a module outside the interface: label_emb)."""
    find = getattr(model, "label_embedding", None)
    if callable(find):
        return find()
    return getattr(model, "label_emb", None)


def architecture_of(keys):
    """
    The family a checkpoint's keys belong to: the arch whose signature prefixes its keys carry
    (None when no registered family's do).
    """
    keys = list(keys)
    for arch, cls in ARCHITECTURES.items():
        if cls.signature_prefixes and all(
            any(k.startswith(prefix) for k in keys) for prefix in cls.signature_prefixes
        ):
            return arch
    return None


def set_precision(model, precision):
    """
    Cast a network's torso: "fp16", "bf16" or "fp32" through its convert_to_* method (the one
    place the trainers and the samplers convert a network).
    """
    convert = {"fp16": "convert_to_fp16", "bf16": "convert_to_bf16", "fp32": "convert_to_fp32"}
    method = getattr(model, convert[precision], None)
    if method is None:
        raise TypeError(f"{type(model).__name__} has no {convert[precision]}(): it cannot run in "
                        f"{precision}")
    method()
