"""
The ADM networks of Dhariwal & Nichol 2021 (section 3 and appendix): a timestep-conditioned UNet
with residual blocks and self-attention, its super-resolution variant, and the encoder half used
as a noisy-image classifier.

Module creation order and attribute names follow the reference exactly: they decide both the
state-dict layout of the released checkpoints and the random initialisation for a given seed.
"""

from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_bf16, convert_module_to_f16, convert_module_to_f32
from .networks import DenoisingNetwork
from .runtime.shapes import image_hw
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


def _attend(qkv, n_heads, legacy):
    """
    Multi-head softmax attention, softmax(q k^T / sqrt(C)) v (Vaswani et al. 2017, eq. 1), over a
    packed qkv tensor given token-major.

    :param qkv: an [N x T x (3 * H * C)] tensor; `legacy` says how its channels are laid out.
    :param n_heads: the number of heads H.
    :param legacy: True for [head 0: q, k, v | head 1: q, k, v | ...], False for
        [all q | all k | all v] (each split into heads).
    :return: an [N x T x (H * C)] tensor.
    """
    batch, length, width = qkv.shape
    ch = _head_channels(width, n_heads)
    # deviation from reference: the reference multiplies q and k by C**-0.25 and runs two einsums
    # with an fp32 softmax, materialising the T x T weights. scaled_dot_product_attention computes
    # the same quantity, but its fused kernels (flash attention on CPU; flash, memory-efficient
    # and cuDNN on GPU) only accept 4-D [N, H, T, C] inputs whose channel axis has stride 1
    # (anything else silently takes the slow math kernel). Token-major qkv gives exactly that
    # with views only.
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if legacy:
        q, k, v = qkv.unflatten(-1, (n_heads, 3, ch)).unbind(3)
    else:
        q, k, v = qkv.unflatten(-1, (3, n_heads, ch)).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    # The kernels write [N, T, H, C] memory, so this is a view, not a copy.
    return out.transpose(1, 2).reshape(batch, length, n_heads * ch)


class QKVAttentionLegacy(nn.Module):
    """
    Multi-head attention over a packed qkv tensor whose channels are laid out head by head:
    [head 0: q, k, v | head 1: q, k, v | ...]. This is the layout of the original checkpoints.

    :param n_heads: the number of heads.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        """
        :param qkv: an [N x (H * 3 * C) x T] tensor (fastest when it is a transposed view of
            token-major [N x T x (H * 3 * C)] memory, as AttentionBlock passes it).
        :return: an [N x (H * C) x T] tensor (a transposed view of token-major memory).
        """
        return _attend(qkv.transpose(1, 2), self.n_heads, legacy=True).transpose(1, 2)


class QKVAttention(nn.Module):
    """
    Multi-head attention over a packed qkv tensor laid out as [all q | all k | all v], each split
    into heads afterwards (the "new attention order").

    :param n_heads: the number of heads.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        """
        :param qkv: an [N x (3 * H * C) x T] tensor (fastest when it is a transposed view of
            token-major memory).
        :return: an [N x (H * C) x T] tensor (a transposed view of token-major memory).
        """
        return _attend(qkv.transpose(1, 2), self.n_heads, legacy=False).transpose(1, 2)


def _head_channels(width, n_heads):
    if width % (3 * n_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * {n_heads} heads")
    return width // (3 * n_heads)


def _pointwise_tokens(conv, x):
    """
    Apply a 1x1 Conv1d to token-major [N x T x C] features, giving token-major [N x T x C_out]
    (the same weights and result as conv(x.transpose(1, 2)).transpose(1, 2)).
    """
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


class AttentionPool2d(nn.Module):
    """
    Attention pooling as in CLIP (Radford et al. 2021): the spatial mean attends over all
    positions (plus itself), with a learned positional embedding, and its output is projected.

    :param spacial_dim: the side length of the square feature map, or its (height, width)
        (an addition: rectangles).
    :param embed_dim: the input channels.
    :param num_heads_channels: channels per attention head.
    :param output_dim: output channels (defaults to embed_dim).
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        height, width = image_hw(spacial_dim)
        if embed_dim % num_heads_channels:
            raise ValueError(
                f"attention pooling over {embed_dim} channels needs a multiple of "
                f"num_head_channels={num_heads_channels}"
            )
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, height * width + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        """
        :param x: an [N x C x H x W] tensor.
        :return: an [N x output_dim] tensor.
        """
        batch, channels = x.shape[:2]
        x = x.reshape(batch, channels, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class TimestepBlock(nn.Module):
    """
    A module whose forward takes the timestep embedding as a second argument.
    """

    @abstractmethod
    def forward(self, x, emb):
        """
        :param x: the features.
        :param emb: an [N x emb_channels] timestep embedding.
        """


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """
    A sequence of layers; those that are TimestepBlocks also receive the timestep embedding.
    """

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    :param channels: input channels.
    :param use_conv: apply a convolution after upsampling.
    :param dims: 1, 2 or 3 spatial dims; with 3, only the inner two are upsampled.
    :param out_channels: output channels when use_conv (defaults to channels).
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        _check_channels(x, self.channels, "Upsample")
        if self.dims == 3:
            size = (x.shape[2], x.shape[3] * 2, x.shape[4] * 2)
            x = F.interpolate(x, size, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """
    2x downsampling by a strided 3x3 convolution or by average pooling.

    :param channels: input channels.
    :param use_conv: use a strided convolution instead of average pooling.
    :param dims: 1, 2 or 3 spatial dims; with 3, only the inner two are downsampled.
    :param out_channels: output channels (must equal channels without use_conv).
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without use_conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        _check_channels(x, self.channels, "Downsample")
        return self.op(x)


def _check_channels(x, expected, where):
    if x.shape[1] != expected:
        raise ValueError(
            f"{where} expects {expected} channels, got a tensor of shape {tuple(x.shape)}"
        )


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding, optionally changing the channel count
    or resolution (the BigGAN-style up/down blocks of Dhariwal & Nichol 2021, section 3).

    :param channels: input channels.
    :param emb_channels: timestep embedding channels.
    :param dropout: dropout rate before the last convolution.
    :param out_channels: output channels (defaults to channels).
    :param use_conv: when changing channels, use a 3x3 instead of a 1x1 skip convolution.
    :param use_scale_shift_norm: condition by GroupNorm(h) * (1 + scale) + shift (adaptive group
        normalisation, AdaGN) instead of adding the embedding.
    :param dims: 1, 2 or 3 spatial dims.
    :param use_checkpoint: recompute activations in backward to save memory.
    :param up: upsample inside the block.
    :param down: downsample inside the block.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        """
        :param x: an [N x C x ...] tensor of features.
        :param emb: an [N x emb_channels] timestep embedding.
        :return: an [N x out_channels x ...] tensor.
        """
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the activation and the convolution, on both paths.
            *pre_conv, conv = self.in_layers
            h = x
            for layer in pre_conv:
                h = layer(h)
            h = conv(self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)

        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            norm, *rest = self.out_layers
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm(h) * (1 + scale) + shift
            for layer in rest:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """
    Self-attention over all spatial positions, with a residual connection (as in Ho et al. 2020's
    UNet, extended to several heads and N-d inputs).

    :param channels: input channels.
    :param num_heads: number of heads, used when num_head_channels is -1.
    :param num_head_channels: if not -1, a fixed width per head (overrides num_heads).
    :param use_checkpoint: recompute activations in backward to save memory.
    :param use_new_attention_order: split q/k/v before heads (QKVAttention) instead of after
        (QKVAttentionLegacy).
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(
                    f"attention over {channels} channels cannot be split into "
                    f"num_heads={num_heads} heads: pass a --num_heads dividing {channels}"
                )
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention over {channels} channels is not divisible by "
                    f"num_head_channels={num_head_channels}: pass a --num_head_channels dividing "
                    f"{channels} (or -1 to use --num_heads), or change "
                    "--num_channels/--channel_mult"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            self.attention = QKVAttention(self.num_heads)
        else:
            self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        # deviation from reference: the reference always checkpoints attention regardless of
        # use_checkpoint; we follow the flag (gradients are identical either way).
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        batch, channels, *spatial = x.shape
        # The 1x1 convolutions run token-major ([N, T, C]) so that the attention kernel gets
        # q, k, v with contiguous channels without any copy (see _attend); the parameters are
        # still those of the reference's Conv1d modules. The norm sees the N-d input (the same
        # statistics as over [N, C, T]), so a channels_last input is already token-major and
        # needs no copy at all; contiguous() copies the others once (a matmul on the transposed
        # view can take a slow strided path on CPU).
        tokens = self.norm(x).reshape(batch, channels, -1).transpose(1, 2).contiguous()
        qkv = _pointwise_tokens(self.qkv, tokens)
        h = self.attention(qkv.transpose(1, 2)).transpose(1, 2)
        h = _pointwise_tokens(self.proj_out, h)
        return x + h.transpose(1, 2).reshape(batch, channels, *spatial)


def _fp16_dtype(use_fp16):
    return torch.float16 if use_fp16 else torch.float32


class _EncoderBuilder:
    """
    Builds the downsampling half shared by UNetModel and EncoderUNetModel, keeping track of the
    channel count, downsample rate and feature sizes the callers need afterwards.
    """

    def __init__(
        self,
        *,
        model_channels,
        time_embed_dim,
        dropout,
        dims,
        use_checkpoint,
        use_scale_shift_norm,
        num_head_channels,
        use_new_attention_order,
    ):
        self.model_channels = model_channels
        self.time_embed_dim = time_embed_dim
        self.dropout = dropout
        self.dims = dims
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.num_head_channels = num_head_channels
        self.use_new_attention_order = use_new_attention_order

    def resblock(self, ch, out_channels=None, up=False, down=False):
        return ResBlock(
            ch,
            self.time_embed_dim,
            self.dropout,
            out_channels=out_channels,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def attention(self, ch, num_heads):
        return AttentionBlock(
            ch,
            use_checkpoint=self.use_checkpoint,
            num_heads=num_heads,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )

    def input_blocks(
        self,
        *,
        in_channels,
        channel_mult,
        num_res_blocks,
        attention_resolutions,
        num_heads,
        conv_resample,
        resblock_updown,
    ):
        """
        :return: (ModuleList of blocks, channels after each block, final channels, final
            downsample rate, summed channels of all blocks).
        """
        ch = int(channel_mult[0] * self.model_channels)
        blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(self.dims, in_channels, ch, 3, padding=1))]
        )
        chans = [ch]
        feature_size = ch
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * self.model_channels)
                layers = [self.resblock(ch, out_channels=out_ch)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(self.attention(ch, num_heads))
                blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
                feature_size += ch
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = self.resblock(ch, out_channels=ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, dims=self.dims, out_channels=ch)
                blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
                feature_size += ch
        return blocks, chans, ch, ds, feature_size

    def middle_block(self, ch, num_heads):
        return TimestepEmbedSequential(
            self.resblock(ch), self.attention(ch, num_heads), self.resblock(ch)
        )


def _time_embed(model_channels, time_embed_dim):
    return nn.Sequential(
        linear(model_channels, time_embed_dim),
        nn.SiLU(),
        linear(time_embed_dim, time_embed_dim),
    )


class UNetModel(DenoisingNetwork):
    """
    The ADM UNet: timestep (and optionally class) conditioned, with residual blocks, multi-head
    self-attention at chosen resolutions and skip connections between the two halves. A
    DenoisingNetwork (guided_diffusion/networks.py), --arch unet.

    :param image_size: input side length, or (height, width) (used by subclasses and for
        bookkeeping).
    :param in_channels: input channels.
    :param model_channels: base channel count.
    :param out_channels: output channels.
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which to use attention.
    :param dropout: dropout rate in the residual blocks.
    :param channel_mult: channel multiplier per level.
    :param conv_resample: resample with learned convolutions rather than plain interpolation.
    :param dims: 1, 2 or 3 spatial dims.
    :param num_classes: number of classes for class conditioning, or None for unconditional.
    :param use_checkpoint: gradient checkpointing in every residual and attention block.
    :param use_fp16: run the torso in float16 (after convert_to_fp16()).
    :param num_heads: attention heads (when num_head_channels is -1).
    :param num_head_channels: if not -1, a fixed width per head.
    :param num_heads_upsample: heads in the upsampling half (-1: same as num_heads). Deprecated.
    :param use_scale_shift_norm: AdaGN conditioning in the residual blocks.
    :param resblock_updown: resample with residual blocks instead of Upsample/Downsample.
    :param use_new_attention_order: QKVAttention instead of QKVAttentionLegacy.
    """

    arch = "unet"
    label_key = "label_emb.weight"
    # The way down and the way up: the noisy-image classifier (the way down alone) lacks the
    # second, a DiT both.
    signature_prefixes = ("input_blocks.", "output_blocks.")

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = _fp16_dtype(use_fp16)
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = _time_embed(model_channels, time_embed_dim)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        builder = _EncoderBuilder(
            model_channels=model_channels,
            time_embed_dim=time_embed_dim,
            dropout=dropout,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
        )
        self.input_blocks, skip_chans, ch, ds, feature_size = builder.input_blocks(
            in_channels=in_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads,
            conv_resample=conv_resample,
            resblock_updown=resblock_updown,
        )
        self.middle_block = builder.middle_block(ch, num_heads)
        feature_size += ch

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers = [builder.resblock(ch + skip_chans.pop(), out_channels=out_ch)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(builder.attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(builder.resblock(ch, out_channels=ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                feature_size += ch
        self._feature_size = feature_size

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """Cast the torso (input, middle and output blocks) to float16."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)

    def convert_to_bf16(self):
        """
        Cast the torso (input, middle and output blocks) to bfloat16 and run it in bfloat16.

        An addition to the reference: the --use_bf16 counterpart of convert_to_fp16 (embeddings,
        norms and the output head stay float32 in the same way).
        """
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_bf16)
        self.dtype = torch.bfloat16

    def convert_to_fp32(self):
        """Cast the torso back to float32 (a bfloat16 torso also computes in float32 again)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)
        if self.dtype == torch.bfloat16:
            self.dtype = torch.float32

    @classmethod
    def layout_flags(cls, shapes, like=None):
        """The flags a UNet checkpoint's shapes tell at once (its width, its labels); the
        rest of its layout is found by the hints' search (cli/hints.py)."""
        flags = {"arch": "unet"}
        if "time_embed.0.weight" in shapes:
            flags["num_channels"] = shapes["time_embed.0.weight"][1]
        flags["class_cond"] = cls.label_key in shapes
        return flags

    def _embed(self, timesteps, y, batch):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if not check_y(y, self.num_classes, batch):
            return emb
        return emb + self.label_emb(y)

    def forward(self, x, timesteps, y=None):
        """
        :param x: an [N x C x ...] tensor of inputs.
        :param timesteps: a 1-D tensor of N (possibly fractional) timesteps.
        :param y: an [N] tensor of labels, required if and only if the model is class-conditional.
        :return: an [N x out_channels x ...] tensor.
        """
        emb = self._embed(timesteps, y, x.shape[0])
        skips = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def check_y(y, num_classes, batch):
    """
    Check a network's labels argument against its conditioning.

    :param y: the labels given to forward (None or an [N] tensor).
    :param num_classes: the rows of the network's label table, or None when unconditional.
    :param batch: N.
    :return: True when the network is class-conditional (y then passed every check).
    :raises ValueError: y given to an unconditional network, missing for a conditional one, of
        the wrong shape, or outside [0, num_classes).
    """
    if num_classes is None:
        if y is not None:
            raise ValueError(
                "labels y were given but the model is unconditional: build it with "
                "--class_cond True (or do not pass y)"
            )
        return False
    if y is None:
        raise ValueError(
            "the model is class-conditional (--class_cond True): pass y, an [N] tensor of labels"
        )
    if y.shape != (batch,):
        raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
    _check_labels(y, num_classes)
    return True


def _check_labels(y, num_classes):
    """
    Refuse labels outside [0, num_classes) without synchronising with an accelerator.

    Labels enter from load_data (whose class count check_dataset_classes compares with
    --num_classes) or from the samplers' randint, so this guards library callers.
    """
    # deviation from reference: the reference does not check (an out-of-range label is a silent
    # garbage embedding or a crash deep inside the GPU kernel). torch._assert_async checks on the
    # device: a GPU reports a failure asynchronously (a device-side assert) instead of stopping
    # the host every forward, it traces into torch.compile graphs, and on the CPU it raises at
    # once, which becomes the one-line error.
    message = f"labels must lie in [0, {num_classes}): pass --num_classes to match the dataset"
    in_range = ((y >= 0) & (y < num_classes)).all()
    if torch.compiler.is_compiling():
        torch._assert_async(in_range, message)
        return
    try:
        torch._assert_async(in_range, message)
    except RuntimeError:
        raise ValueError(message) from None


def _feature_grid(image_size, ds):
    """The feature map's side (a square) or (height, width) at downsample rate ds."""
    height, width = image_hw(image_size)
    return height // ds if height == width else (height // ds, width // ds)


class SuperResModel(UNetModel):
    """
    A UNetModel for super-resolution: the low-resolution image, bilinearly upsampled to the input
    size, is concatenated to the input as extra channels. Takes the same arguments as UNetModel;
    `in_channels` counts the image channels only.
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        """
        :param x: an [N x C x H x W] noisy high-resolution input.
        :param timesteps: a 1-D tensor of N timesteps.
        :param low_res: an [N x C x h x w] low-resolution conditioning image.
        :param kwargs: passed on to UNetModel.forward (e.g. y).
        :return: an [N x out_channels x H x W] tensor.
        """
        if low_res is None:
            raise ValueError("SuperResModel needs the low-resolution image: pass low_res=...")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(nn.Module):
    """
    The downsampling half of the UNet followed by a pooling head; used as the noisy-image
    classifier for guidance. Arguments are those of UNetModel, plus:

    :param pool: the head: "adaptive" (average pool + 1x1 conv), "attention" (AttentionPool2d,
        needs num_head_channels), "spatial" or "spatial_v2" (an MLP over the per-block
        spatial means of every block's features).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ValueError(
                f"unknown classifier pool {pool!r}: use adaptive, attention, spatial or spatial_v2"
            )
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("attention pooling needs num_head_channels (not -1)")

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = _fp16_dtype(use_fp16)
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = _time_embed(model_channels, time_embed_dim)
        builder = _EncoderBuilder(
            model_channels=model_channels,
            time_embed_dim=time_embed_dim,
            dropout=dropout,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
        )
        self.input_blocks, _, ch, ds, feature_size = builder.input_blocks(
            in_channels=in_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads,
            conv_resample=conv_resample,
            resblock_updown=resblock_updown,
        )
        self.middle_block = builder.middle_block(ch, num_heads)
        self._feature_size = feature_size + ch

        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(_feature_grid(image_size, ds), ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        else:
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )

    def convert_to_fp16(self):
        """Cast the torso (input and middle blocks) to float16."""
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)

    def convert_to_bf16(self):
        """Cast the torso (input and middle blocks) to bfloat16 and run it in bfloat16."""
        self.input_blocks.apply(convert_module_to_bf16)
        self.middle_block.apply(convert_module_to_bf16)
        self.dtype = torch.bfloat16

    def convert_to_fp32(self):
        """Cast the torso back to float32 (a bfloat16 torso also computes in float32 again)."""
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        if self.dtype == torch.bfloat16:
            self.dtype = torch.float32

    def forward(self, x, timesteps):
        """
        :param x: an [N x C x H x W] tensor of inputs.
        :param timesteps: a 1-D tensor of N timesteps.
        :return: an [N x out_channels] tensor of logits.
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.type(x.dtype))
