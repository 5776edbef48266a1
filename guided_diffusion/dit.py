"""
The diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers",
arXiv:2212.09748): the input is cut into p x p patches, each patch becomes a token, a stack of
transformer blocks conditioned by adaLN-Zero (section 3.2) processes the tokens, and a linear
decoder turns each token back into a patch of noise (and variance) values.

Checkpoint-compatible with facebookresearch/DiT: module names, parameter shapes, the order in
which parameters are created and initialised, and the arithmetic of the forward pass are theirs,
so their released state dicts (DiT-XL/2 at 256 and 512 pixels) load with strict=True and give
the same outputs. The outputs follow the UNet's convention: out_channels = in_channels, or
2 * in_channels with learn_sigma, the noise prediction first and the variance values after it.
"""

from typing import NamedTuple

import torch
import torch.nn as nn

from .diffusion.guidance import check_class_dropout_prob, label_rows
from .networks import DenoisingNetwork
from .nn import checkpoint, linear, timestep_embedding
from .runtime.shapes import image_hw
from .unet import _attend, check_y

# Width of the sinusoidal timestep features fed to the timestep MLP (the official value).
FREQUENCY_EMBEDDING_SIZE = 256
# The LayerNorms have no affine parameters and this epsilon.
LAYER_NORM_EPS = 1e-6


class DiTSize(NamedTuple):
    """One named model size: depth (blocks), hidden width, attention heads, patch side."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


# The paper's Table 1 (S, B, L, XL), each with patch sides 2, 4 and 8 (its Table 4).
_TABLE_1 = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_SIZES = {
    f"DiT-{name}/{patch}": DiTSize(depth, width, heads, patch)
    for name, (depth, width, heads) in _TABLE_1.items()
    for patch in (2, 4, 8)
}


# A size outside the table, for small experiments and tests: "depth=4,width=128,heads=4,patch=2".
_CUSTOM_FIELDS = {"depth": "depth", "width": "hidden_size", "heads": "num_heads",
                  "patch": "patch_size"}


def dit_size(name):
    """
    The DiTSize of a --dit_model value: one of the twelve names ("DiT-S/2" ... "DiT-XL/8"), or
    a custom size written "depth=D,width=W,heads=H,patch=P" (an addition: the official code has
    the twelve only).

    :raises ValueError: naming the accepted values.
    """
    if name in DIT_SIZES:
        return DIT_SIZES[name]
    fields = {}
    for part in str(name).split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _CUSTOM_FIELDS or not value.strip().isdigit():
            fields = None
            break
        fields[_CUSTOM_FIELDS[key]] = int(value)
    if not fields or len(fields) != len(_CUSTOM_FIELDS) or min(fields.values()) < 1:
        raise ValueError(
            f"unknown --dit_model {name!r}: use one of {', '.join(DIT_SIZES)}, or a custom size "
            "like depth=4,width=128,heads=4,patch=2"
        )
    return DiTSize(**fields)


def size_name(size):
    """The --dit_model value of a DiTSize: its table name, else the custom form."""
    for name, known in DIT_SIZES.items():
        if known == size:
            return name
    return (f"depth={size.depth},width={size.hidden_size},heads={size.num_heads},"
            f"patch={size.patch_size}")


def dit_model(name, **kwargs):
    """
    Build one of the twelve named DiTs (or a custom size, see dit_size).

    :param name: "DiT-S/2" ... "DiT-XL/8" (a key of DIT_SIZES).
    :param kwargs: the remaining DiT arguments (image_size, in_channels, num_classes, ...).
    :return: a DiT.
    """
    return DiT(**dit_size(name)._asdict(), **kwargs)


def sincos_position_embedding(grid_hw, dim):
    """
    Fixed 2-D sine-cosine position features of a token grid (the 1-D encoding of Vaswani et al.
    2017, section 3.5, applied to each axis): the first dim/2 channels encode the token's column,
    the last dim/2 its row, each half as [sin(pos * w_k) | cos(pos * w_k)] with
    w_k = 10000 ** (-k / (dim / 4)), k < dim / 4. Computed in float64 and rounded once.

    :param grid_hw: (rows, columns) of the token grid.
    :param dim: the channel count, a multiple of 4.
    :return: a [rows * columns x dim] float32 tensor, tokens in row-major order.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    rows, cols = grid_hw
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row, col = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )

    def encode(positions):
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


def modulate(x, shift, scale):
    """
    adaLN's affine map of normalised tokens, x * (1 + scale) + shift, with one shift and scale
    per sample broadcast over the tokens.

    :param x: [N x T x D] tokens.
    :param shift: [N x 1 x D].
    :param scale: [N x 1 x D].
    """
    return x * (1 + scale) + shift


class LayerNorm32(nn.LayerNorm):
    """
    LayerNorm that normalises in float32 and returns the input's dtype (as GroupNorm32 does for
    the UNet), so a half-precision torso keeps full-precision statistics.
    """

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _norm(width):
    return LayerNorm32(width, elementwise_affine=False, eps=LAYER_NORM_EPS)


class PatchEmbedder(nn.Module):
    """
    Cut an image into non-overlapping p x p patches and project each to a token: a stride-p
    convolution, tokens in row-major patch order.

    :param in_channels: image channels.
    :param hidden_size: token width.
    :param patch_size: the patch side p.
    """

    def __init__(self, in_channels, hidden_size, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        """
        :param x: [N x C x H x W].
        :return: [N x (H/p * W/p) x hidden_size].
        """
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """
    The sinusoidal features of the timestep followed by a two-layer SiLU MLP.

    :param hidden_size: output width.
    :param frequency_embedding_size: width of the sinusoidal features.
    """

    def __init__(self, hidden_size, frequency_embedding_size=FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            linear(hidden_size, hidden_size),
        )

    def forward(self, timesteps):
        """
        :param timesteps: a 1-D tensor of N (possibly fractional) timesteps.
        :return: [N x hidden_size] float32.
        """
        return self.mlp(timestep_embedding(timesteps, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """
    A table of class embeddings; with class_dropout_prob > 0 it has one more row, the null class
    (index num_classes) that classifier-free guidance samples with.

    :param num_classes: the number of real classes.
    :param hidden_size: embedding width.
    :param class_dropout_prob: the rate at which training replaces labels by the null class.
    """

    def __init__(self, num_classes, hidden_size, class_dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = class_dropout_prob
        self.embedding_table = nn.Embedding(label_rows(num_classes, class_dropout_prob), hidden_size)

    def forward(self, y):
        """
        :param y: an [N] tensor of labels in [0, rows) (checked by DiT.forward).
        :return: [N x hidden_size].
        """
        # deviation from facebookresearch/DiT: theirs replaces labels by the null class inside
        # forward while the module is in training mode, and does not check them. Here, as for
        # the UNet, the training loop drops labels (diffusion.guidance.drop_labels), so forward
        # is the same function in train and eval mode and one place owns the random draws; an
        # out-of-range label raises (DiT.forward checks).
        return self.embedding_table(y)


class Attention(nn.Module):
    """
    Multi-head self-attention over tokens with one packed qkv projection, laid out as
    [all q | all k | all v], each split into heads.

    :param hidden_size: token width.
    :param num_heads: heads (hidden_size must divide evenly).
    """

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = linear(hidden_size, 3 * hidden_size)
        self.proj = linear(hidden_size, hidden_size)

    def forward(self, x):
        """
        :param x: [N x T x D] tokens.
        :return: [N x T x D].
        """
        return self.proj(_attend(self.qkv(x), self.num_heads, legacy=False))


class Mlp(nn.Module):
    """
    The transformer's feed-forward part: Linear, GELU (tanh approximation), Linear.

    :param hidden_size: token width.
    :param mlp_width: the inner width.
    """

    def __init__(self, hidden_size, mlp_width):
        super().__init__()
        self.fc1 = linear(hidden_size, mlp_width)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = linear(mlp_width, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """
    A transformer block with adaLN-Zero conditioning (section 3.2): from the conditioning vector
    c, a linear layer regresses a shift, a scale and a gate for each of the two residual branches,
    x <- x + gate * branch(norm(x) * (1 + scale) + shift). The layer starts at zero, so every
    block starts as the identity.

    :param hidden_size: token width.
    :param num_heads: attention heads.
    :param mlp_ratio: the MLP's inner width over hidden_size.
    :param use_checkpoint: recompute activations in backward to save memory.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_checkpoint=False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = _norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = _norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        """
        :param x: [N x T x D] tokens.
        :param c: [N x D] conditioning (timestep plus label embedding).
        :return: [N x T x D].
        """
        return checkpoint(self._forward, (x, c), self.parameters(), self.use_checkpoint)

    def _forward(self, x, c):
        # The conditioning path stays float32 (like the UNet's emb_layers); its output joins
        # the torso's dtype.
        mod = self.adaLN_modulation(c).type(x.dtype)[:, None]
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_attn * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """
    The decoder: an adaLN-modulated LayerNorm (shift and scale, no gate) and a linear map from
    each token to its patch of p * p * out_channels values.

    :param hidden_size: token width.
    :param patch_size: the patch side p.
    :param out_channels: output channels.
    """

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = _norm(hidden_size)
        self.linear = linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(DenoisingNetwork):
    """
    A DenoisingNetwork (guided_diffusion/networks.py), --arch dit.

    The diffusion transformer: patch tokens plus fixed 2-D sine-cosine positions, `depth`
    adaLN-Zero blocks conditioned on the timestep (and class) embedding, and a linear decoder
    back to patches.

    :param image_size: the input's side, or (height, width); both divisible by patch_size. For
        the released latent models this is the latent size (32 for 256-pixel images).
    :param in_channels: input channels (4 for Stable Diffusion VAE latents, 3 or 1 for pixels).
    :param hidden_size: token width D (a multiple of 4 and of num_heads).
    :param depth: number of transformer blocks.
    :param num_heads: attention heads per block.
    :param patch_size: the patch side p.
    :param mlp_ratio: the MLP's inner width over hidden_size.
    :param num_classes: the number of classes for class conditioning, or None for an
        unconditional model (no label table; forward takes no y).
    :param class_dropout_prob: > 0 adds the null-class row (index num_classes) to the label
        table for classifier-free guidance; the training loop does the dropping.
    :param learn_sigma: also output the variance values: out_channels = 2 * in_channels.
    :param use_checkpoint: gradient checkpointing in every block.
    :param use_fp16: recorded for the factories, as UNetModel takes it; the torso computes in
        float16 once convert_to_fp16() has cast it (and in float32 until then, so a model built
        with the flag is whole before the trainer takes its float32 master copies).
    """

    arch = "dit"
    label_key = "y_embedder.embedding_table.weight"
    signature_prefixes = ("x_embedder.", "final_layer.")

    def __init__(
        self,
        *,
        image_size,
        in_channels,
        hidden_size,
        depth,
        num_heads,
        patch_size,
        mlp_ratio=4.0,
        num_classes=None,
        class_dropout_prob=0.0,
        learn_sigma=False,
        use_checkpoint=False,
        use_fp16=False,
    ):
        super().__init__()
        height, width = image_hw(image_size)
        _check_config(height, width, hidden_size, num_heads, patch_size, num_classes,
                      class_dropout_prob)
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.dtype = torch.float32
        self.grid = (height // patch_size, width // patch_size)

        # Created in the official order: with the same seed, the same initial weights.
        self.x_embedder = PatchEmbedder(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # deviation from facebookresearch/DiT: num_classes=None is an unconditional model
        # without a label table (theirs always has one); image_size may be a rectangle (their
        # positions and unpatchify assume a square; on squares these are theirs).
        if num_classes is not None:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # deviation from facebookresearch/DiT: theirs holds the fixed positions in a Parameter
        # with requires_grad=False; a persistent buffer has the same state-dict entry, but stays
        # out of parameters(), so optimizers, weight decay, fp16 master copies and EMA never
        # touch it.
        self.register_buffer(
            "pos_embed", sincos_position_embedding(self.grid, hidden_size)[None], persistent=True
        )
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, use_checkpoint) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """
        The paper's initialisation (section 3.2, adaLN-Zero): Xavier-uniform linear layers with
        zero biases, the patch projection like a linear layer over its flattened patch, N(0, 0.02)
        label table and timestep MLP weights, and zeros for every adaLN modulation layer and the
        decoder's linear layer, so a fresh model outputs exactly zero. The draws come in the
        official order.
        """
        self.apply(_xavier_linear)  # children before parents, in creation order
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.num_classes is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for modulation in [block.adaLN_modulation for block in self.blocks] + [
            self.final_layer.adaLN_modulation
        ]:
            nn.init.zeros_(modulation[-1].weight)
            nn.init.zeros_(modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _torso(self):
        """The modules that run in half precision: the patch projection and each block's
        attention and MLP (the conditioning path, the norms and the decoder stay float32)."""
        return [self.x_embedder] + [part for b in self.blocks for part in (b.attn, b.mlp)]

    def convert_to_fp16(self):
        """Cast the torso to float16 and run it in float16."""
        for part in self._torso():
            part.to(torch.float16)
        self.dtype = torch.float16

    def convert_to_bf16(self):
        """Cast the torso to bfloat16 and run it in bfloat16."""
        for part in self._torso():
            part.to(torch.bfloat16)
        self.dtype = torch.bfloat16

    def convert_to_fp32(self):
        """Cast the torso back to float32 and compute in float32 again."""
        for part in self._torso():
            part.to(torch.float32)
        self.dtype = torch.float32

    @classmethod
    def layout_flags(cls, shapes, like=None):
        """
        A DiT's whole layout from its shapes: the patch projection gives the width and the
        patch side, the blocks the depth, the fixed positions the token grid (a square image),
        the decoder the output channels. The heads leave no trace in the shapes: a named size's
        are taken, else those of `like` (a built DiT) when they divide the width.
        """
        proj = shapes.get("x_embedder.proj.weight")
        if proj is None or len(proj) != 4:
            return {"arch": "dit"}
        width, in_channels, patch = proj[0], proj[1], proj[2]
        depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
        named = [s for s in DIT_SIZES.values()
                 if (s.depth, s.hidden_size, s.patch_size) == (depth, width, patch)]
        guesses = ([like.num_heads] if like is not None else []) + [16, 12, 8, 6, 4, 2, 1]
        heads = named[0].num_heads if named else next(h for h in guesses if width % h == 0)
        flags = {"arch": "dit", "dit_model": size_name(DiTSize(depth, width, heads, patch)),
                 "in_channels": in_channels}
        out = shapes.get("final_layer.linear.weight")
        if out is not None:
            flags["learn_sigma"] = out[0] == 2 * in_channels * patch * patch
        tokens = shapes.get("pos_embed", (1, 0))[1]
        side = round(tokens ** 0.5)
        if side * side == tokens and side:
            flags["image_size"] = side * patch
        flags["class_cond"] = cls.label_key in shapes
        return flags

    def _condition(self, timesteps, y, batch):
        """The conditioning vector c = timestep embedding (+ label embedding), float32."""
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must have shape ({batch},), got {tuple(timesteps.shape)}")
        c = self.t_embedder(timesteps)
        rows = None if self.num_classes is None else self.y_embedder.embedding_table.num_embeddings
        if not check_y(y, rows, batch):
            return c
        return c + self.y_embedder(y)

    def unpatchify(self, tokens):
        """
        :param tokens: [N x T x (p * p * C)], each token's values in (row, column, channel) order.
        :return: the [N x C x H x W] image.
        """
        rows, cols = self.grid
        p, channels = self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], rows, cols, p, p, channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, rows * p, cols * p)

    def forward(self, x, timesteps, y=None):
        """
        :param x: an [N x in_channels x H x W] tensor (the image_size the model was built for).
        :param timesteps: a 1-D tensor of N (possibly fractional) timesteps.
        :param y: an [N] tensor of labels, required if and only if the model is class-conditional
            (the null class is index num_classes when class_dropout_prob > 0).
        :return: an [N x out_channels x H x W] tensor in x's dtype: the noise prediction in the
            first in_channels channels, then (learn_sigma) the variance values.
        """
        expected = (self.in_channels, *image_hw(self.image_size))
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"this DiT takes [N x {' x '.join(map(str, expected))}] inputs (its --in_channels "
                f"and --image_size), got {tuple(x.shape)}"
            )
        c = self._condition(timesteps, y, x.shape[0])
        h = self.x_embedder(x.type(self.dtype)) + self.pos_embed.type(self.dtype)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h.type(x.dtype), c))


def _xavier_linear(module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def _check_config(height, width, hidden_size, num_heads, patch_size, num_classes,
                  class_dropout_prob):
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"a DiT with patch size {patch_size} needs an image size divisible by it, got "
            f"{height}x{width}: change --image_size or pick another --dit_model"
        )
    if hidden_size % num_heads or hidden_size % 4:
        raise ValueError(
            f"a DiT's hidden width {hidden_size} must be divisible by 4 and by its {num_heads} heads"
        )
    check_class_dropout_prob(class_dropout_prob, class_cond=num_classes is not None)
