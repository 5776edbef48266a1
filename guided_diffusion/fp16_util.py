"""
Half-precision training support: converting a model's torso to float16, and a trainer that keeps
float32 master weights with a dynamic loss scale (Micikevicius et al. 2018, "Mixed Precision
Training").
"""

import numpy as np
import torch
import torch.nn as nn

from . import logger

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
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_bf16(module):
    """
    Like convert_module_to_f16, but to bfloat16 (the float32 exponent range, so no loss scaling
    is needed in training).

    :param module: a module visited by `apply`.
    """
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.bfloat16()
        if module.bias is not None:
            module.bias.data = module.bias.data.bfloat16()


def convert_module_to_f32(module):
    """
    Undo convert_module_to_f16 (or _bf16): cast a convolution's weights back to float32.

    :param module: a module visited by `apply`.
    """
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


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
        grads = [param_grad_or_zeros(p).float() for _, p in group]
        master.grad = _flatten(grads).view(shape)


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
        for (_, param), value in zip(group, unflatten_master_params(group, master)):
            param.detach().copy_(value)


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


class MixedPrecisionTrainer:
    """
    Wraps backward and optimizer steps for a model trained in float32 or with a float16 torso.

    With use_fp16 the model's torso is converted to float16, the optimizer works on float32 master
    copies, and the loss is scaled by 2**lg_loss_scale; a step whose gradients overflow is skipped
    and the scale halved, otherwise lg_loss_scale grows by fp16_scale_growth.

    :param model: a model with convert_to_fp16() (UNetModel, EncoderUNetModel).
    :param use_fp16: train with the float16 torso.
    :param fp16_scale_growth: increase of lg_loss_scale after each successful step.
    :param initial_lg_loss_scale: starting log2 loss scale.
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
    ):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.lg_loss_scale = initial_lg_loss_scale

        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        if use_fp16:
            # Master copies are taken before the conversion so they hold the exact fp32 weights.
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self):
        """Zero the model's gradients."""
        zero_grad(self.model_params)

    def backward(self, loss):
        """
        :param loss: a scalar loss; scaled by 2**lg_loss_scale first when training in fp16.
        """
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """
        Take an optimizer step (logging grad_norm and param_norm).

        :param opt: an optimizer over self.master_params.
        :return: True if the step was taken, False if it was skipped because of an overflow.
        """
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _optimize_fp16(self, opt):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        scale = 2**self.lg_loss_scale
        grad_norm, param_norm = self._compute_norms(grad_scale=scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False

        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for param in self.master_params:
            param.grad.mul_(1.0 / scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt):
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    @torch.no_grad()
    def _compute_norms(self, grad_scale=1.0):
        grad_sq, param_sq = 0.0, 0.0
        for param in self.master_params:
            param_sq += torch.norm(param, p=2, dtype=torch.float32).item() ** 2
            if param.grad is not None:
                grad_sq += torch.norm(param.grad, p=2, dtype=torch.float32).item() ** 2
        return np.sqrt(grad_sq) / grad_scale, np.sqrt(param_sq)

    def master_params_to_state_dict(self, master_params):
        """
        :param master_params: master tensors in this trainer's layout (e.g. an EMA copy).
        :return: a state dict of the model holding those values.
        """
        return master_params_to_state_dict(
            self.model, self.param_groups_and_shapes, master_params, self.use_fp16
        )

    def state_dict_to_master_params(self, state_dict):
        """
        :param state_dict: a state dict of the model.
        :return: master tensors in this trainer's layout.
        """
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)
