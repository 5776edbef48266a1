"""
Half-precision training support: converting a model's torso to float16, and a trainer that keeps
float32 master weights with a dynamic loss scale (Micikevicius et al. 2018, "Mixed Precision
Training").
"""

import numpy as np
import torch
import torch.nn as nn

from . import logger
from .networks import set_precision

# The loss is multiplied by 2**lg_loss_scale before backward; 2**20 is the starting scale.
INITIAL_LOG_LOSS_SCALE = 20.0

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module):
    """
    Cast a convolution's weights to float16; any other module is left alone. Meant for
    `model.apply(...)`: linear layers and norms stay in float32 on purpose (the timestep embedding
    path and the normalisation statistics need the range).

    :param module: a module visited by `apply`.
    """
    _cast_conv(module, torch.float16)


def convert_module_to_bf16(module):
    """
    Like convert_module_to_f16, but to bfloat16 (the float32 exponent range, so no loss scaling
    is needed in training).

    :param module: a module visited by `apply`.
    """
    _cast_conv(module, torch.bfloat16)


def convert_module_to_f32(module):
    """
    Undo convert_module_to_f16 (or _bf16): cast a convolution's weights back to float32.

    :param module: a module visited by `apply`.
    """
    _cast_conv(module, torch.float32)


def _cast_conv(module, dtype):
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def _flatten(tensors):
    return torch.cat([t.contiguous().view(-1) for t in tensors])


def _unflatten(flat, like):
    pieces, start = [], 0
    for t in like:
        pieces.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return pieces


def get_param_groups_and_shapes(named_model_params):
    """
    Split named parameters into two groups, each flattened into one master tensor: scalars and
    vectors (biases, norm gains) as a 1-D tensor, and matrices and kernels as a [1 x n] tensor.
    Keeping the groups apart lets weight decay be configured per group.

    :param named_model_params: an iterable of (name, parameter).
    :return: [(vector group, shape), (matrix group, shape)], each group a list of (name, param).
    """
    named = list(named_model_params)
    vectors = [(name, p) for name, p in named if p.ndim <= 1]
    matrices = [(name, p) for name, p in named if p.ndim > 1]
    return [(vectors, (-1)), (matrices, (1, -1))]


def make_master_params(param_groups_and_shapes):
    """
    Build the float32 master copy of each parameter group as one flat trainable tensor.

    :param param_groups_and_shapes: the result of get_param_groups_and_shapes.
    :return: a list of nn.Parameter, one per group.
    """
    master_params = []
    for group, shape in param_groups_and_shapes:
        flat = _flatten([p.detach().float() for _, p in group]).view(shape)
        master_params.append(nn.Parameter(flat, requires_grad=True))
    return master_params


def param_grad_or_zeros(param):
    """
    :param param: a parameter.
    :return: its gradient (detached), or zeros of its shape when it received none.
    """
    if param.grad is None:
        return torch.zeros_like(param)
    return param.grad.detach()


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """
    Gather the (half-precision) model gradients into the master parameters' `.grad`, in float32.

    :param param_groups_and_shapes: the result of get_param_groups_and_shapes.
    :param master_params: the result of make_master_params.
    """
    for master, (group, shape) in zip(master_params, param_groups_and_shapes):
        grads = [param_grad_or_zeros(p).reshape(-1) for _, p in group]
        # cat converts into the float32 buffer directly (no float32 copy of each gradient first).
        flat = torch.empty(master.numel(), dtype=torch.float32, device=master.device)
        master.grad = torch.cat(grads, out=flat).view(shape)


def unflatten_master_params(param_group, master_param):
    """
    :param param_group: a list of (name, param) giving the shapes.
    :param master_param: the flat master tensor of that group.
    :return: a list of views of `master_param`, one per parameter, with its shape.
    """
    return _unflatten(master_param.view(-1), [p for _, p in param_group])


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """
    Copy the master weights back into the model parameters (casting to their dtype).

    :param param_groups_and_shapes: the result of get_param_groups_and_shapes.
    :param master_params: the result of make_master_params.
    """
    for master, (group, _) in zip(master_params, param_groups_and_shapes):
        targets = [param.detach() for _, param in group]
        # One foreach copy (with the cast) instead of a Python loop of copies.
        torch._foreach_copy_(targets, unflatten_master_params(group, master))


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """
    Build a float32 state dict of `model` whose parameters come from `master_params` (for saving
    checkpoints and EMA copies).

    :param model: the model (gives names, buffers and order).
    :param param_groups_and_shapes: the groups, when use_fp16.
    :param master_params: flat master tensors (use_fp16) or one tensor per model parameter.
    :param use_fp16: which layout `master_params` has.
    :return: a state dict.
    """
    state_dict = model.state_dict()
    if use_fp16:
        for master, (group, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(group, unflatten_master_params(group, master)):
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """
    The inverse of master_params_to_state_dict.

    :param model: the model (gives the parameter names and order).
    :param state_dict: a state dict of the model.
    :param use_fp16: build flat fp32 groups when True, else one tensor per parameter.
    :return: a list of master tensors.
    """
    named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
    if use_fp16:
        return make_master_params(get_param_groups_and_shapes(named))
    return [value for _, value in named]


def zero_master_grads(master_params):
    """
    :param master_params: master tensors whose gradients are dropped.
    """
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    """
    Zero the gradients of the given parameters in place (keeping the tensors).

    :param model_params: an iterable of parameters.
    """
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def check_overflow(value):
    """
    :param value: a float (e.g. a gradient norm).
    :return: True when it is infinite or NaN.
    """
    return not np.isfinite(value)


def make_adamw(params, lr, weight_decay=0.0):
    """
    AdamW over `params`, fused into one kernel where torch has one for their device.

    # deviation from reference: the reference uses torch's default AdamW (one kernel per
    # parameter on CPU). The fused kernel is the same update (up to rounding), ~3x faster on CPU,
    # and can skip a step on a device-side flag (found_inf), so that an fp16 overflow needs no
    # host synchronisation.

    :return: a torch.optim.AdamW.
    """
    params = list(params)
    device = params[0].device.type if params else "cpu"
    if device in _FUSED_ADAM_DEVICES:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):
            pass  # e.g. a dtype the fused kernel does not take
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


_FUSED_ADAM_DEVICES = ("cuda", "cpu", "xpu", "mps")


def _takes_found_inf(opt):
    # Fused Adam/AdamW/SGD read grad_scale and found_inf from the optimizer, as GradScaler
    # drives them; the other implementations refuse them.
    return bool(opt.defaults.get("fused"))


def _all_ranks_any(flag):
    """Make a device flag true on every rank if it is true on one (no host synchronisation)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag > 0


def checked_grad_clip(grad_clip):
    """
    :return: --grad_clip as a float (0 = no clipping).
    :raises ValueError: for a negative (or NaN) value.
    """
    if not grad_clip >= 0:
        raise ValueError(f"--grad_clip must be >= 0 (0 = no clipping), got {grad_clip}")
    return float(grad_clip)


@torch.no_grad()
def clip_to_global_norm(grads, grad_norm, max_norm):
    """
    Scale gradients in place by min(1, max_norm / (grad_norm + 1e-6)), on the device (no host
    synchronisation). A non-finite norm (a step the loss scaler skips, or a run about to stop
    on a non-finite loss) leaves them as they are.

    :param grads: the gradient tensors (one dtype).
    :param grad_norm: their global L2 norm, a 0-d tensor.
    :param max_norm: the largest norm allowed (> 0).
    :return: the norm after clipping, a 0-d tensor.
    """
    coef = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
    coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return grad_norm * coef


class MixedPrecisionTrainer:
    """
    Wraps backward and optimizer steps for a model trained in float32, or with a float16 or
    bfloat16 torso.

    With use_fp16 the model's torso is converted to float16, the optimizer works on float32 master
    copies, and the loss is scaled by 2**lg_loss_scale; a step whose gradients overflow is skipped
    and the scale halved, otherwise lg_loss_scale grows by fp16_scale_growth. With use_bf16 the
    torso is bfloat16 with float32 masters in the same way, without loss scaling (bfloat16 has
    float32's range).

    The step itself never waits for the device: whether a step was taken, the loss scale and the
    logged norms stay device tensors (the logger reads them at dumpkvs()). A step whose loss or
    gradients are not finite is skipped in every precision; in float32 and bfloat16 that is fatal
    and the training loop stops at its next check (see skipped_steps).

    :param model: a model with convert_to_fp16() / convert_to_bf16() (a DenoisingNetwork of
        guided_diffusion/networks.py, or the classifier EncoderUNetModel).
    :param use_fp16: train with the float16 torso.
    :param fp16_scale_growth: increase of lg_loss_scale after each successful step.
    :param initial_lg_loss_scale: starting log2 loss scale.
    :param use_bf16: train with the bfloat16 torso (an addition to the reference).
    :param grad_clip: > 0: scale the master gradients down so that their global L2 norm (the
        unscaled one with fp16) is at most this, on the device, before the step; 0 (the
        reference's behaviour) never clips. An addition to the reference.
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        use_bf16=False,
        grad_clip=0.0,
    ):
        if use_fp16 and use_bf16:
            raise ValueError("--use_fp16 and --use_bf16 exclude each other: pick one")
        self.grad_clip = checked_grad_clip(grad_clip)
        self.model = model
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.fp16_scale_growth = fp16_scale_growth

        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        device = self.model_params[0].device if self.model_params else torch.device("cpu")
        # log2 of the loss scale, kept on the device so that updating it needs no sync; its
        # per-step change is picked on the device from these two constants.
        dtype = _accumulator_dtype(device)
        self._lg_loss_scale = torch.tensor(float(initial_lg_loss_scale), dtype=dtype, device=device)
        self._scale_growth = torch.tensor(float(fp16_scale_growth), dtype=dtype, device=device)
        self._scale_backoff = torch.tensor(-1.0, dtype=dtype, device=device)
        # Steps skipped (overflow or non-finite values) since the trainer was made.
        self.skipped_steps = torch.zeros((), device=device)
        self._loss_finite = None
        if use_fp16 or use_bf16:
            # Master copies are taken before the conversion so they hold the exact fp32 weights.
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            set_precision(model, "fp16" if use_fp16 else "bf16")

    @property
    def lg_loss_scale(self):
        """log2 of the fp16 loss scale, as a float (reading it waits for the device)."""
        return float(self._lg_loss_scale)

    @lg_loss_scale.setter
    def lg_loss_scale(self, value):
        self._lg_loss_scale.fill_(float(value))

    @property
    def lg_loss_scale_tensor(self):
        """log2 of the fp16 loss scale as a 0-dim device tensor (no synchronisation)."""
        return self._lg_loss_scale

    def zero_grad(self):
        """Zero the model's gradients."""
        zero_grad(self.model_params)
        self._loss_finite = None

    def backward(self, loss):
        """
        :param loss: a scalar loss; scaled by 2**lg_loss_scale first when training in fp16.
        """
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        if self.use_fp16:
            (loss * torch.exp2(self._lg_loss_scale).to(loss.dtype)).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """
        Take an optimizer step (logging grad_norm and param_norm).

        :param opt: an optimizer over self.master_params.
        :return: True if the step was taken, False if it was skipped (this waits for the device;
            optimize_no_sync does not).
        """
        return bool(self.optimize_no_sync(opt))

    def optimize_no_sync(self, opt):
        """
        Take an optimizer step unless the gradients (or, as given to backward, the loss) are not
        finite, without waiting for the device when `opt` is fused (see make_adamw); other
        optimizers need one synchronisation to decide.

        :param opt: an optimizer over self.master_params.
        :return: a 0-dim bool tensor on the device, True if the step was taken.
        """
        if self.param_groups_and_shapes is not None:
            model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        grad_norm, param_norm = self._norm_tensors()
        found_inf = ~torch.isfinite(grad_norm)
        if self._loss_finite is not None:
            found_inf = found_inf | ~self._loss_finite
        # Every rank must take or skip the step together (the gradients are averaged, but a
        # non-finite loss may be local).
        found_inf = _all_ranks_any(found_inf)
        took = ~found_inf
        scale = None
        if self.use_fp16:
            logger.logkv_mean("lg_loss_scale", self._lg_loss_scale)
            scale = torch.exp2(self._lg_loss_scale).float()
            grad_norm = grad_norm / scale
        # As in the reference, the norms are logged for taken steps only.
        logger.logkv_mean("grad_norm", grad_norm, count=took)
        logger.logkv_mean("param_norm", param_norm, count=took)
        if self.grad_clip > 0:
            self._clip_master_grads(grad_norm, took)

        if _takes_found_inf(opt):
            # Unscaling and skipping happen inside the fused kernel, on the device.
            opt.grad_scale = scale
            opt.found_inf = found_inf.float()
            try:
                opt.step()
            finally:
                opt.grad_scale = None
                opt.found_inf = None
        elif bool(took):
            if scale is not None:
                torch._foreach_div_([p.grad for p in self.master_params], scale)
            opt.step()

        if self.param_groups_and_shapes is not None:
            zero_master_grads(self.master_params)
            master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        if self.use_fp16:
            # Halve the scale on overflow (skipping the step), else grow it.
            self._lg_loss_scale.add_(torch.where(took, self._scale_growth, self._scale_backoff))
        self.skipped_steps.add_(found_inf.float())
        return took

    @torch.no_grad()
    def _clip_master_grads(self, grad_norm, took):
        """
        Scale the master gradients by min(1, grad_clip / (norm + 1e-6)) on the device (no host
        synchronisation), where grad_norm is their unscaled global norm; with fp16 the gradients
        still carry the loss scale, which the optimizer step divides out afterwards, so the
        threshold applies to the true gradient. Logs grad_norm_clipped (the norm after it).
        """
        grads = [p.grad for p in self.master_params if p.grad is not None]
        if grads:
            clipped = clip_to_global_norm(grads, grad_norm, self.grad_clip)
            logger.logkv_mean("grad_norm_clipped", clipped, count=took)

    @torch.no_grad()
    def _norm_tensors(self):
        """Global L2 norms of the (scaled) master gradients and of the master weights, on device."""
        params = self.master_params
        param_norm = _global_norm(params)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = _global_norm(grads) if grads else torch.zeros_like(param_norm)
        return grad_norm, param_norm

    def master_params_to_state_dict(self, master_params):
        """
        :param master_params: master tensors in this trainer's layout (e.g. an EMA copy).
        :return: a state dict of the model holding those values.
        """
        return master_params_to_state_dict(
            self.model, self.param_groups_and_shapes, master_params, self._flat_masters
        )

    def state_dict_to_master_params(self, state_dict):
        """
        :param state_dict: a state dict of the model.
        :return: master tensors in this trainer's layout.
        """
        return state_dict_to_master_params(self.model, state_dict, self._flat_masters)

    @property
    def _flat_masters(self):
        # fp16 and bf16 keep flat float32 master groups; float32 trains the model's own tensors.
        return self.param_groups_and_shapes is not None


def _accumulator_dtype(device):
    # float64 where the device has it: lg_loss_scale grows by 1e-3 per step for millions of steps.
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _global_norm(tensors):
    """sqrt of the sum of squares of all elements, in float32, as a 0-dim device tensor."""
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms))
