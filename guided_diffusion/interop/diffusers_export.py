"""
Export to Hugging Face diffusers: our ADM UNet becomes a `diffusers.UNet2DModel`, our DiT a
`diffusers.DiTTransformer2DModel`, and the diffusion's noise schedule a `diffusers.DDPMScheduler`,
written as a diffusers folder (config.json + safetensors weights per component):

    OUT/unet/           UNet2DModel            (OUT/transformer/ for a DiT)
    OUT/scheduler/      DDPMScheduler
    OUT/model_index.json                       (only for an unconditional UNet: DDPMPipeline)

Nothing is approximated. A layout UNet2DModel cannot express (the noisy classifier, the
super-resolution model, attention heads of different widths, ...) is refused with one line
(`ScriptError`) before anything is written, and the converted weights must fill the diffusers
model exactly (strict loading), so a mapping that missed a parameter fails instead of exporting
a different network.

The facts of the mapping (docs/interop.md has the table):
- Timesteps: ours are [cos | sin] of t * exp(-ln(10000) i / half), which is diffusers'
  `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`.
- A residual block is diffusers' ResnetBlock2D (AdaGN = resnet_time_scale_shift "scale_shift");
  a level with attention is AttnDownBlock2D / AttnUpBlock2D, one without DownBlock2D / UpBlock2D,
  or ResnetDownsampleBlock2D / ResnetUpsampleBlock2D when it resamples with residual blocks
  (--resblock_updown True).
- Our packed qkv 1x1 convolution is split into diffusers' to_q / to_k / to_v linear layers; how
  it is split depends on --use_new_attention_order (heads outermost in the legacy layout).
- diffusers has one attention head width for the whole UNet (attention_head_dim), or one head
  per block when it is None; ours fixes either the head count (--num_heads) or the head width
  (--num_head_channels), so only networks whose attention blocks all share one head width (or
  all have one head) map.

diffusers is imported only inside the functions that need it (an optional dependency).
"""

import json
import os
import shutil
import tempfile

import torch
import torch.nn as nn

from ..diffusion.types import ModelMeanType, ModelVarType
from ..dit import DiT
from ..errors import ScriptError
from ..unet import (
    AttentionBlock,
    Downsample,
    EncoderUNetModel,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    UNetModel,
    Upsample,
)

__all__ = [
    "import_diffusers",
    "unet_to_diffusers",
    "dit_to_diffusers",
    "scheduler_config",
    "to_diffusers",
    "export_diffusers",
    "use_dit_timestep_frequencies",
    "EXPORT_MARKERS",
]

# The subfolders (and file) an export writes; an --out_dir holding one of them holds an export.
EXPORT_MARKERS = ("unet", "transformer", "scheduler", "model_index.json")
# ADM's GroupNorm (nn.normalization): 32 groups, torch's default epsilon.
_GROUPS, _GROUP_NORM_EPS = 32, 1e-5


def import_diffusers():
    """The diffusers module, or a one-line error naming the package to install."""
    try:
        import diffusers
    except ImportError:
        raise ScriptError(
            "exporting to diffusers needs the diffusers package: pip install diffusers "
            "safetensors"
        ) from None
    return diffusers


def _refuse(what):
    raise ScriptError(f"cannot export to diffusers: {what}")


class _Export(dict):
    """The diffusers state dict being filled from our parameters (float32 copies)."""

    def pair(self, key, ours):
        self[key] = ours.detach().float().clone()

    def split(self, keys, ours, layout, shape):
        """Our packed tensor `ours`, viewed by `layout` as [len(keys), ...], one key each (of
        diffusers' `shape`)."""
        for key, part in zip(keys, layout(ours.detach())):
            self[key] = part.reshape(shape).float().clone()


class _Import:
    """Our parameters being filled from a diffusers state dict (the inverse of _Export)."""

    def __init__(self, state):
        self.state = state
        self.used = set()

    def _take(self, key, shape):
        self.used.add(key)
        value = self.state[key]
        if value.numel() != torch.Size(shape).numel():
            raise RuntimeError(f"{key} has shape {tuple(value.shape)}, ours {tuple(shape)}")
        return value.reshape(shape)

    @torch.no_grad()
    def pair(self, key, ours):
        ours.copy_(self._take(key, ours.shape))

    @torch.no_grad()
    def split(self, keys, ours, layout, shape):
        # The layouts are views of ours' memory: write each part through the same view.
        for key, part in zip(keys, layout(ours)):
            part.copy_(self._take(key, part.shape))


def _put(io, prefix, module):
    """The module's weight and bias under prefix.weight / prefix.bias."""
    io.pair(f"{prefix}.weight", module.weight)
    if getattr(module, "bias", None) is not None:
        io.pair(f"{prefix}.bias", module.bias)


def _put_resblock(io, prefix, block):
    if not isinstance(block, ResBlock):
        raise TypeError(f"expected a ResBlock at {prefix}, got {type(block).__name__}")
    _put(io, f"{prefix}.norm1", block.in_layers[0])
    _put(io, f"{prefix}.conv1", block.in_layers[2])
    _put(io, f"{prefix}.time_emb_proj", block.emb_layers[1])
    _put(io, f"{prefix}.norm2", block.out_layers[0])
    _put(io, f"{prefix}.conv2", block.out_layers[3])
    skip = block.skip_connection
    if not isinstance(skip, nn.Identity):
        if skip.kernel_size != (1, 1):
            _refuse("a residual block with a 3x3 skip convolution (ResnetBlock2D's is 1x1)")
        _put(io, f"{prefix}.conv_shortcut", skip)


def _put_attention(io, prefix, block):
    """Our AttentionBlock as diffusers' Attention (group_norm, to_q/k/v, to_out.0)."""
    width, heads = block.channels, block.attention.n_heads
    head = width // heads
    if isinstance(block.attention, QKVAttentionLegacy):
        # [head 0: q, k, v | head 1: q, k, v | ...]: pick each of q, k, v from every head; the
        # heads stay outermost, which is how diffusers splits a projection into heads.
        def weights(w):
            return w.view(heads, 3, head, width).transpose(0, 1)

        def biases(b):
            return b.view(heads, 3, head).transpose(0, 1)
    else:
        # [all q | all k | all v], each already heads-outermost.
        def weights(w):
            return w.view(3, width, width)

        def biases(b):
            return b.view(3, width)
    names = ("to_q", "to_k", "to_v")
    _put(io, f"{prefix}.group_norm", block.norm)
    io.split([f"{prefix}.{n}.weight" for n in names], block.qkv.weight, weights, (width, width))
    io.split([f"{prefix}.{n}.bias" for n in names], block.qkv.bias, biases, (width,))
    # A 1x1 Conv1d ([C, C, 1]) is diffusers' Linear ([C, C]).
    io.split([f"{prefix}.to_out.0.weight"], block.proj_out.weight,
             lambda w: w.view(1, width, width), (width, width))
    io.pair(f"{prefix}.to_out.0.bias", block.proj_out.bias)


def _attention_head_dim(model):
    """
    diffusers' single attention_head_dim for our attention blocks: their shared head width, or
    None when every block has one head (diffusers then gives each block one head).
    """
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    widths = sorted({b.channels // b.attention.n_heads for b in blocks})
    if all(b.attention.n_heads == 1 for b in blocks):
        return None
    if len(widths) == 1:
        return widths[0]
    layout = ", ".join(
        sorted({f"{b.attention.n_heads} heads over {b.channels} channels" for b in blocks})
    )
    _refuse(
        f"its attention heads have different widths ({layout}: heads of "
        f"{', '.join(map(str, widths))} channels), but diffusers' UNet2DModel has one "
        "attention_head_dim for every block; a model trained with --num_head_channels (or "
        "--num_heads 1) maps"
    )


def _check_unet(model):
    if isinstance(model, EncoderUNetModel):
        _refuse(
            "the noisy-image classifier (EncoderUNetModel) has no diffusers counterpart; "
            "export a diffusion model (--model_path of image_train.py's model)"
        )
    if isinstance(model, SuperResModel):
        _refuse(
            "the super-resolution model concatenates an upsampled low-resolution image to its "
            "input inside forward, which diffusers' UNet2DModel has no input for"
        )
    if not isinstance(model, UNetModel):
        _refuse(f"{type(model).__name__} is neither our UNetModel nor our DiT")
    first = model.input_blocks[0][0]
    if not isinstance(first, nn.Conv2d):
        _refuse("only 2-D UNets map onto UNet2DModel")
    if first.out_channels != model.model_channels:
        _refuse(
            f"its first level is {first.out_channels} channels wide, not --num_channels "
            f"{model.model_channels} (--channel_mult must start with 1): UNet2DModel sizes its "
            "timestep features by the first level's width"
        )


def unet_to_diffusers(model):
    """
    The UNet2DModel config and state dict of our UNet.

    :param model: a UNetModel (float32, float16 or bfloat16 weights; exported as float32).
    :return: (config dict for diffusers.UNet2DModel, {diffusers key: float32 tensor}).
    :raises ScriptError: when diffusers cannot express the network.
    """
    state = _Export()
    return _walk_unet(model, state), dict(state)


def _walk_unet(model, state):
    """
    Pair every parameter of our UNet with its UNet2DModel key, through `state` (an _Export or
    an _Import: one walk serves both directions), and return the UNet2DModel config.
    """
    _check_unet(model)
    levels, per_level = len(model.channel_mult), model.num_res_blocks
    widths = [int(m * model.model_channels) for m in model.channel_mult]
    updown = any(isinstance(b[0], ResBlock) and b[0].updown for b in model.input_blocks)
    _put(state, "conv_in", model.input_blocks[0][0])
    _put(state, "time_embedding.linear_1", model.time_embed[0])
    _put(state, "time_embedding.linear_2", model.time_embed[2])
    if model.num_classes is not None:
        _put(state, "class_embedding", model.label_emb)

    down_types, attn_levels = [], []
    index = 1
    for level in range(levels):
        has_attn = False
        for j in range(per_level):
            block = model.input_blocks[index]
            _put_resblock(state, f"down_blocks.{level}.resnets.{j}", block[0])
            if len(block) > 1:
                has_attn = True
                _put_attention(state, f"down_blocks.{level}.attentions.{j}", block[1])
            index += 1
        if level != levels - 1:
            down = model.input_blocks[index][0]
            prefix = f"down_blocks.{level}.downsamplers.0"
            if isinstance(down, ResBlock):
                _put_resblock(state, prefix, down)
            elif isinstance(down, Downsample) and down.use_conv:
                _put(state, f"{prefix}.conv", down.op)
            else:
                _refuse("average-pool downsampling (conv_resample=False) has no diffusers block")
            index += 1
        attn_levels.append(has_attn)
        if has_attn:
            down_types.append("AttnDownBlock2D")
        else:
            down_types.append("ResnetDownsampleBlock2D" if updown else "DownBlock2D")

    mid = model.middle_block
    _put_resblock(state, "mid_block.resnets.0", mid[0])
    _put_attention(state, "mid_block.attentions.0", mid[1])
    _put_resblock(state, "mid_block.resnets.1", mid[2])

    up_types = []
    for u in range(levels):
        level = levels - 1 - u
        for j in range(per_level + 1):
            block = list(model.output_blocks[u * (per_level + 1) + j])
            _put_resblock(state, f"up_blocks.{u}.resnets.{j}", block.pop(0))
            if block and isinstance(block[0], AttentionBlock):
                if not attn_levels[level]:
                    _refuse("attention in the upsampling half only at a level")
                _put_attention(state, f"up_blocks.{u}.attentions.{j}", block.pop(0))
            elif attn_levels[level]:
                _refuse("attention in the downsampling half only at a level")
            if block:
                up = block[0]
                prefix = f"up_blocks.{u}.upsamplers.0"
                if isinstance(up, ResBlock):
                    _put_resblock(state, prefix, up)
                elif isinstance(up, Upsample) and up.use_conv:
                    _put(state, f"{prefix}.conv", up.conv)
                else:
                    _refuse("upsampling without a convolution (conv_resample=False)")
        if attn_levels[level]:
            up_types.append("AttnUpBlock2D")
        else:
            up_types.append("ResnetUpsampleBlock2D" if updown else "UpBlock2D")
    _put(state, "conv_norm_out", model.out[0])
    _put(state, "conv_out", model.out[2])

    dropouts = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    scale_shift = any(isinstance(m, ResBlock) and m.use_scale_shift_norm for m in model.modules())
    size = model.image_size
    config = dict(
        sample_size=size if isinstance(size, int) else list(size),
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        center_input_sample=False,
        time_embedding_type="positional",
        freq_shift=0,
        flip_sin_to_cos=True,
        down_block_types=down_types,
        up_block_types=up_types,
        block_out_channels=widths,
        layers_per_block=per_level,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        dropout=max(dropouts) if dropouts else 0.0,
        act_fn="silu",
        attention_head_dim=_attention_head_dim(model),
        norm_num_groups=_GROUPS,
        # Without this diffusers drops the middle attention's GroupNorm under "scale_shift".
        attn_norm_num_groups=_GROUPS,
        norm_eps=_GROUP_NORM_EPS,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=None if model.num_classes is None else model.label_emb.num_embeddings,
    )
    return config


def dit_to_diffusers(model):
    """
    The DiTTransformer2DModel config and state dict of our DiT.

    diffusers' DiT repeats the timestep and label embedders in every block (norm1.emb) and reads
    the first block's for the final layer; the same weights are written into each. Its label
    table always has the null-class row; a DiT trained without label dropout gets a zero row
    there (it is never used by labels below num_classes).

    :raises ScriptError: when diffusers cannot express the network.
    """
    if not isinstance(model, DiT):
        _refuse(f"{type(model).__name__} is not our DiT")
    if model.num_classes is None:
        _refuse("an unconditional DiT: diffusers' DiTTransformer2DModel always adds a class "
                "embedding (train with --class_cond True)")
    height, width = model.grid[0] * model.patch_size, model.grid[1] * model.patch_size
    if height != width:
        _refuse(f"a {height}x{width} DiT: DiTTransformer2DModel is square (sample_size)")
    mlp_width = model.blocks[0].mlp.fc1.out_features
    if mlp_width != 4 * model.hidden_size:
        _refuse(f"an MLP {mlp_width} wide: diffusers' DiT blocks are 4 x the hidden width")
    hidden, table = model.hidden_size, model.y_embedder.embedding_table.weight.detach().float()
    if table.shape[0] == model.num_classes:
        table = torch.cat([table, table.new_zeros(1, hidden)])
    state = _Export()
    _walk_dit(model, state, table)
    config = dict(
        num_attention_heads=model.num_heads,
        attention_head_dim=hidden // model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=model.depth,
        dropout=0.0,
        attention_bias=True,
        sample_size=height,
        patch_size=model.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=model.num_classes,
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        # Our DiT's LayerNorms use 1e-6 (as facebookresearch/DiT); diffusers' default is 1e-5.
        norm_eps=1e-6,
    )
    return config, dict(state)


def _walk_dit(model, state, table):
    """Pair every DiT parameter with its DiTTransformer2DModel key(s) through `state`."""
    hidden = model.hidden_size
    names = ("to_q", "to_k", "to_v")
    _put(state, "pos_embed.proj", model.x_embedder.proj)
    for i, block in enumerate(model.blocks):
        prefix = f"transformer_blocks.{i}"
        emb = f"{prefix}.norm1.emb"
        # diffusers repeats the embedders in every block.
        _put(state, f"{emb}.timestep_embedder.linear_1", model.t_embedder.mlp[0])
        _put(state, f"{emb}.timestep_embedder.linear_2", model.t_embedder.mlp[2])
        state.pair(f"{emb}.class_embedder.embedding_table.weight", table)
        _put(state, f"{prefix}.norm1.linear", block.adaLN_modulation[1])
        # One packed projection laid out [all q | all k | all v] (as diffusers splits heads).
        state.split([f"{prefix}.attn1.{n}.weight" for n in names], block.attn.qkv.weight,
                    lambda w: w.view(3, hidden, hidden), (hidden, hidden))
        state.split([f"{prefix}.attn1.{n}.bias" for n in names], block.attn.qkv.bias,
                    lambda b: b.view(3, hidden), (hidden,))
        _put(state, f"{prefix}.attn1.to_out.0", block.attn.proj)
        _put(state, f"{prefix}.ff.net.0.proj", block.mlp.fc1)
        _put(state, f"{prefix}.ff.net.2", block.mlp.fc2)
    _put(state, "proj_out_1", model.final_layer.adaLN_modulation[1])
    _put(state, "proj_out_2", model.final_layer.linear)


def use_dit_timestep_frequencies(transformer):
    """
    Make a loaded diffusers DiTTransformer2DModel embed timesteps as DiT does.

    diffusers' DiT blocks embed timesteps with `Timesteps(downscale_freq_shift=1)`, frequencies
    exp(-ln(10000) i / (half - 1)); facebookresearch/DiT (and ours) divide by half. No config
    field selects it (diffusers' own conversion of the released DiT weights has the same
    difference), so this sets the attribute on each Timesteps module after loading. Without
    it the transformer computes a slightly different function of t.

    :param transformer: a DiTTransformer2DModel.
    :return: the same module.
    """
    from diffusers.models.embeddings import Timesteps

    for module in transformer.modules():
        if isinstance(module, Timesteps):
            module.downscale_freq_shift = 0
    return transformer


def scheduler_config(diffusion):
    """
    The DDPMScheduler config of our diffusion's training process: its betas (so alphas_cumprod
    is ours), the variance it samples with and what the model predicts.

    :param diffusion: a GaussianDiffusion / SpacedDiffusion over all its training steps.
    :raises ScriptError: for what DDPMScheduler cannot express.
    """
    steps = len(diffusion.betas)
    original = getattr(diffusion, "original_num_steps", steps)
    if original != steps:
        _refuse(f"a diffusion respaced to {steps} of {original} steps: export the training "
                "process (no --timestep_respacing)")
    if diffusion.rescale_timesteps and steps != 1000:
        _refuse(f"--rescale_timesteps True with --diffusion_steps {steps}: the model sees "
                "timesteps scaled to [0, 1000), which diffusers' schedulers do not do")
    variance = {
        ModelVarType.LEARNED_RANGE: "learned_range",
        ModelVarType.FIXED_SMALL: "fixed_small",
        ModelVarType.FIXED_LARGE: "fixed_large",
    }.get(diffusion.model_var_type)
    if variance is None:
        _refuse(f"the variance type {diffusion.model_var_type.name} (a directly predicted "
                "log-variance) has no DDPMScheduler variance_type")
    prediction = {ModelMeanType.EPSILON: "epsilon", ModelMeanType.START_X: "sample"}.get(
        diffusion.model_mean_type)
    if prediction is None:
        _refuse(f"a model predicting {diffusion.model_mean_type.name} has no DDPMScheduler "
                "prediction_type")
    return dict(
        num_train_timesteps=steps,
        # The exact float64 betas, written out: alphas_cumprod is then ours (to float32
        # rounding) whatever the schedule (linear, cosine, ...).
        trained_betas=[float(b) for b in diffusion.betas],
        variance_type=variance,
        prediction_type=prediction,
        # Our samplers clip the predicted x_0 to [-1, 1] (--clip_denoised True).
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="leading",
        steps_offset=0,
    )


def to_diffusers(model):
    """
    The diffusers network equal to ours, with our weights: a UNet2DModel for a UNetModel, a
    DiTTransformer2DModel for a DiT (its timestep frequencies set as DiT's, see
    use_dit_timestep_frequencies).

    :return: (diffusers model in eval mode, its subfolder name "unet" or "transformer").
    """
    diffusers = import_diffusers()
    if isinstance(model, DiT):
        config, state = dit_to_diffusers(model)
        network, name = diffusers.DiTTransformer2DModel(**config), "transformer"
    else:
        config, state = unet_to_diffusers(model)
        network, name = diffusers.UNet2DModel(**config), "unet"
    # strict: every diffusers parameter filled, no key of ours left over, every shape equal.
    network.load_state_dict(state, strict=True)
    if name == "transformer":
        # diffusers computes the fixed 2-D sine-cosine positions itself (not saved): they must
        # be ours, or the layout differs.
        theirs = network.pos_embed.pos_embed.detach().float()
        if theirs.shape != model.pos_embed.shape or not torch.allclose(
                theirs, model.pos_embed.float(), atol=1e-5):
            _refuse("diffusers' DiT position features differ from this DiT's")
        use_dit_timestep_frequencies(network)
    return network.eval(), name


def _holds_export(folder):
    return any(os.path.exists(os.path.join(folder, m)) for m in EXPORT_MARKERS)


def check_out_dir(out_dir, overwrite=False):
    """
    Refuse, before any work, an --out_dir the export must not write: one holding an earlier
    export (unless overwrite), one holding anything else, or a file.

    :raises ScriptError: naming the flag.
    """
    if not out_dir:
        raise ScriptError("no output folder given: pass --out_dir DIR")
    if os.path.isfile(out_dir):
        raise ScriptError(f"--out_dir {out_dir} is a file: pass a folder")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not _holds_export(out_dir):
        raise ScriptError(
            f"--out_dir {out_dir} holds files that are not a diffusers export: pass an empty or "
            "new folder"
        )
    if not overwrite:
        raise ScriptError(
            f"--out_dir {out_dir} already holds a diffusers export: pass --overwrite True to "
            "replace it, or another --out_dir"
        )


def export_diffusers(model, diffusion, out_dir, overwrite=False):
    """
    Write the diffusers folder of a model and its diffusion, atomically: everything is written
    into a temporary sibling folder, which is then renamed to out_dir (an earlier export there
    is replaced only with overwrite, and only once the new one is complete). An interrupted
    export leaves out_dir as it was.

    :param model: our UNetModel or DiT.
    :param diffusion: its training diffusion (all steps).
    :param out_dir: the folder to create.
    :param overwrite: replace an earlier export in out_dir.
    :return: the list of files written, relative to out_dir.
    :raises ScriptError: for a model or folder that cannot be exported (nothing is written).
    """
    diffusers = import_diffusers()
    check_out_dir(out_dir, overwrite)
    network, name = to_diffusers(model)
    scheduler = diffusers.DDPMScheduler(**scheduler_config(diffusion))
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, os.path.basename(out_dir))
    tmp = tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(out_dir))
    old = None
    try:
        network.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        if name == "unet" and model.num_classes is None:
            # DDPMPipeline.from_pretrained(out_dir) works for an unconditional UNet (the pipeline
            # passes no class labels, so a class-conditional model gets no model_index.json).
            _write_model_index(tmp)
        # The temporary folder (and some files save_pretrained writes) are private; give them
        # the permissions a plain mkdir/open would, so collaborators can read the export.
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~_umask())
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(out_dir) + "old-")
            os.rename(out_dir, os.path.join(old, "export"))
        os.rename(tmp, out_dir)
        tmp = None
    except BaseException:
        if old is not None and not os.path.exists(out_dir):
            os.rename(os.path.join(old, "export"), out_dir)
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return sorted(
        os.path.relpath(os.path.join(root, f), out_dir)
        for root, _, files in os.walk(out_dir) for f in files
    )


def _write_model_index(folder):
    import diffusers

    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def _temp_prefix(out_dir):
    # The process id in the name tells a live export's temporaries from a killed one's.
    return f".{os.path.basename(out_dir)}.export-{os.getpid()}-"


def _remove_stale_temporaries(parent, base):
    """
    Clear what an export of the same out_dir killed mid-write (SIGKILL, power loss) left: its
    temporary folder, or, when it died between moving the earlier export aside and renaming the
    new one in, that earlier export, which is put back. A live export's folders are left alone.
    """
    prefix = f".{base}.export-"
    for entry in sorted(os.listdir(parent)):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        path = os.path.join(parent, entry)
        kept = os.path.join(path, "export")
        target = os.path.join(parent, base)
        if entry[len(prefix):].split("-")[1:2] == ["old"] and os.path.isdir(kept) \
                and not os.path.exists(target):
            os.rename(kept, target)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------- from a checkpoint

# A key only a DiT checkpoint (ours or facebookresearch/DiT's) has.
_DIT_KEY = "x_embedder.proj.weight"


def load_for_export(args):
    """
    The network and training diffusion that export_diffusers.py exports: --model_path read
    once, built as a DiT when its keys are a DiT's, else as the UNet of the model flags (which
    run_config may have filled from the run's args.json), and loaded with the usual check that
    names the flags to change when it does not fit.

    :param args: the script's parsed flags (model and diffusion flags, num_classes,
        class_dropout_prob, in_channels, model_path).
    :return: (network, diffusion over all training steps).
    """
    from .. import dist_util
    from ..cli.weights import load_model_weights
    from ..script_util import (
        create_model_and_diffusion,
        diffusion_from_flags,
        model_and_diffusion_defaults,
    )

    if not args.model_path:
        raise ScriptError("no checkpoint given: pass --model_path FILE")
    state = dist_util.load_state_dict(args.model_path, map_location="cpu")
    flags = {k: getattr(args, k, v) for k, v in model_and_diffusion_defaults().items()}
    for name in ("num_classes", "class_dropout_prob", "in_channels", "channel_mult"):
        if hasattr(args, name):
            flags[name] = getattr(args, name)
    # How to sample is not part of the export: the scheduler describes the training process.
    flags["timestep_respacing"] = ""
    if _DIT_KEY in state and flags.get("arch", "unet") != "dit":
        model = _dit_from_state(state, flags, args.model_path)
        return model, diffusion_from_flags(flags, "")
    model, diffusion = create_model_and_diffusion(**flags)
    load_model_weights(model, state, args.model_path, flags,
                       build=lambda f: create_model_and_diffusion(**f)[0])
    return model, diffusion


def _dit_from_state(state, flags, path):
    """A DiT shaped as a DiT state dict says, its weights loaded (strict)."""
    from ..dit import DIT_SIZES

    hidden, in_channels, patch, _ = state[_DIT_KEY].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    named = [(n, s) for n, s in DIT_SIZES.items()
             if (s.depth, s.hidden_size, s.patch_size) == (depth, hidden, patch)]
    if not named:
        raise ScriptError(
            f"{path} is a DiT of depth {depth}, width {hidden} and patch {patch}, not one of the "
            "twelve named sizes, so its head count is unknown"
        )
    tokens = state["pos_embed"].shape[1]
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        _refuse(f"{path} is a DiT over a non-square token grid ({tokens} tokens)")
    out = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    learn_sigma = out == 2 * in_channels
    if learn_sigma != flags["learn_sigma"]:
        raise ScriptError(
            f"checkpoint {path} does not fit the model flags: it has {out} output channels for "
            f"{in_channels} input channels: pass --learn_sigma {learn_sigma}"
        )
    num_classes = class_dropout_prob = None
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None:
        rows, asked = table.shape[0], flags["num_classes"]
        if rows == asked + 1:
            num_classes, class_dropout_prob = asked, 0.1
        elif rows == asked:
            num_classes, class_dropout_prob = asked, 0.0
        else:
            raise ScriptError(
                f"checkpoint {path} does not fit the model flags: its label table has {rows} "
                f"rows: pass --num_classes {rows} (or {rows - 1}, with a null-class row)"
            )
    model = DiT(
        image_size=side * patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=named[0][1].num_heads, patch_size=patch, num_classes=num_classes,
        # Only decides whether the table has the null-class row (there is no training here).
        class_dropout_prob=class_dropout_prob or 0.0, learn_sigma=learn_sigma,
    )
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------- from diffusers

# The UNet2DModel settings our UNet always has (anything else is another network).
_FIXED_UNET_CONFIG = dict(
    center_input_sample=False, time_embedding_type="positional", freq_shift=0,
    flip_sin_to_cos=True, mid_block_scale_factor=1, downsample_padding=1, act_fn="silu",
    norm_num_groups=_GROUPS, norm_eps=_GROUP_NORM_EPS, add_attention=True, class_embed_type=None,
    mid_block_type="UNetMidBlock2D",
)


def is_diffusers_folder(path):
    """True when path is a folder holding a diffusers UNet2DModel in unet/."""
    return bool(path) and os.path.isfile(os.path.join(path, "unet", "config.json"))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ScriptError(f"cannot read {path}: {exc}") from None


def flags_from_diffusers(folder):
    """
    Our model and diffusion flags for a diffusers folder holding a UNet2DModel (unet/) and its
    DDPMScheduler (scheduler/) of the layout export_diffusers writes: the inverse of the
    export, refusing a UNet2DModel our UNet cannot be.

    :return: {flag: value} for create_model_and_diffusion.
    :raises ScriptError: naming what does not map.
    """
    config = _read_json(os.path.join(folder, "unet", "config.json"))
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ScriptError(f"{folder}/unet holds a {config['_class_name']}, not a UNet2DModel")

    def refuse(what):
        raise ScriptError(f"cannot load {folder} as our UNet: {what}")

    for key, value in _FIXED_UNET_CONFIG.items():
        if key in config and config[key] != value:
            refuse(f"its {key} is {config[key]!r} (ours: {value!r})")
    widths, per_level = config["block_out_channels"], config["layers_per_block"]
    base = widths[0]
    if any(w % base for w in widths):
        refuse(f"block_out_channels {widths} are not multiples of the first")
    if config.get("time_embedding_dim") not in (None, 4 * base):
        refuse(f"time_embedding_dim {config['time_embedding_dim']} (ours: 4 x {base})")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        refuse(f"resnet_time_scale_shift {shift!r}")
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups not in (_GROUPS, None) or (attn_groups is None and shift == "scale_shift"):
        refuse("its middle attention has no 32-group GroupNorm (attn_norm_num_groups)")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attn = [t == "AttnDownBlock2D" for t in down]
    updown = "ResnetDownsampleBlock2D" in down or config.get("downsample_type") == "resnet"
    plain = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    resample = "resnet" if updown else "conv"
    if (down != [("AttnDownBlock2D" if a else plain) for a in attn]
            or up != [("AttnUpBlock2D" if a else plain_up) for a in attn[::-1]]
            or (any(attn) and (config.get("downsample_type", "conv") != resample
                               or config.get("upsample_type", "conv") != resample))):
        refuse(f"its blocks {down} / {up} are not one of our UNet's layouts")
    size = config["sample_size"]
    if not isinstance(size, int):
        refuse(f"sample_size {size} is not one side")
    in_channels, out_channels = config["in_channels"], config["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        refuse(f"{out_channels} output channels for {in_channels} inputs")
    head_dim = config.get("attention_head_dim")
    classes = config.get("num_class_embeds")
    flags = dict(
        image_size=size, in_channels=in_channels, num_channels=base,
        channel_mult=",".join(str(w // base) for w in widths), num_res_blocks=per_level,
        attention_resolutions=",".join(str(size // 2 ** i) for i, a in enumerate(attn) if a),
        num_heads=1, num_head_channels=-1 if head_dim is None else head_dim,
        num_heads_upsample=-1, use_scale_shift_norm=shift == "scale_shift",
        resblock_updown=updown, use_new_attention_order=True, dropout=config.get("dropout", 0.0),
        learn_sigma=out_channels == 2 * in_channels, class_cond=classes is not None,
        num_classes=classes if classes is not None else 1000, class_dropout_prob=0.0,
    )
    flags.update(_diffusion_flags_from(folder, flags["learn_sigma"]))
    return flags


def _diffusion_flags_from(folder, learn_sigma):
    import numpy as np

    from ..gaussian_diffusion import get_named_beta_schedule

    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    config = _read_json(path)

    def refuse(what):
        raise ScriptError(f"cannot load {folder} as our diffusion: {what}")

    steps = config.get("num_train_timesteps", 1000)
    betas = np.asarray(_scheduler_betas(folder), dtype=np.float64)
    schedule = next((name for name in ("linear", "cosine")
                     if np.allclose(betas, get_named_beta_schedule(name, steps), rtol=1e-5,
                                    atol=1e-9)), None)
    if schedule is None:
        refuse(f"its betas are neither --noise_schedule linear nor cosine over {steps} steps")
    variance = config.get("variance_type", "fixed_small")
    expected = "learned_range" if learn_sigma else "fixed_large"
    if variance != expected:
        refuse(f"variance_type {variance!r} with {'2x' if learn_sigma else '1x'} output "
               f"channels (ours: {expected!r})")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample"):
        refuse(f"prediction_type {prediction!r}")
    return dict(diffusion_steps=steps, noise_schedule=schedule,
                predict_xstart=prediction == "sample", rescale_timesteps=False)


def _scheduler_betas(folder):
    diffusers = import_diffusers()
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return scheduler.betas.double().numpy()


def load_diffusers_weights(model, folder):
    """
    Load a diffusers UNet2DModel's weights (unet/diffusion_pytorch_model.safetensors) into our
    UNet built from flags_from_diffusers(folder): the export's walk run backwards, every
    diffusers tensor used exactly once.

    :raises ScriptError: when the file is missing or its tensors do not fit.
    """
    from safetensors.torch import load_file

    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(path):
        raise ScriptError(f"{folder}/unet has no diffusion_pytorch_model.safetensors")
    state = load_file(path)
    reader = _Import(state)
    try:
        _walk_unet(model, reader)
    except (KeyError, RuntimeError) as exc:
        raise ScriptError(f"{path} does not fit the UNet of its config.json ({exc})") from None
    left = sorted(set(state) - reader.used)
    if left:
        raise ScriptError(f"{path} has tensors our UNet has no place for: {', '.join(left[:3])}")
    return model


def take_diffusers_flags(args):
    """
    When --model_path is a diffusers folder (unet/ + scheduler/), set the model and diffusion
    flags the parsed args have from it (they describe that model, as an args.json does; the
    folder wins over the command line, since other values could not load it).

    :return: True when --model_path is such a folder.
    """
    path = getattr(args, "model_path", "")
    if not is_diffusers_folder(path):
        return False
    for key, value in flags_from_diffusers(path).items():
        if hasattr(args, key):
            setattr(args, key, value)
    return True
