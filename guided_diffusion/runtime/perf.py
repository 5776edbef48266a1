"""
Speed settings shared by the scripts and benchmarks (additions to the reference): torch.compile
of a model's forward with an eager fallback, and TF32 numerics for float32 work on NVIDIA GPUs.
"""

import contextlib
import copy

import torch

from .. import logger


def to_channels_last(model, enabled=True):
    """
    Store the model's 4-D weights in channels-last (NHWC) memory; its convolutions then produce
    channels-last activations, which the attention blocks read as tokens without a copy.
    Shapes, values and state-dict keys are unchanged; inputs may stay NCHW.

    No clear gain on the CPU measured (README, Benchmarks); unmeasured on GPU.

    :return: the same model.
    """
    if enabled:
        model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------- TF32


def set_tf32(enabled, device=None):
    """
    Let float32 matmuls and cuDNN convolutions on CUDA use TF32 (10-bit mantissa inputs, float32
    accumulation), or forbid it. Does nothing unless `device` (default: the current default) is a
    CUDA device, so CPU results never change.

    # deviation from reference: the reference leaves torch's defaults (matmuls in full float32,
    # cuDNN convolutions in TF32); the scripts default to TF32 for both, as most training code does.

    :param enabled: True for TF32, False for full float32 ("ieee") in both.
    :param device: the compute device (torch.device or string), or None for the dist_util one.
    """
    if device is None:
        from .. import dist_util

        device = dist_util.dev()
    if torch.device(device).type != "cuda":
        return
    precision = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None:
        matmul.fp32_precision = precision
        conv.fp32_precision = precision
    else:  # torch before 2.9
        matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


@contextlib.contextmanager
def preserved_float32_precision():
    """Restore torch's float32 precision settings (TF32 and the matmul precision) on exit."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    new_api = hasattr(matmul, "fp32_precision") and conv is not None
    saved = (
        (matmul.fp32_precision, conv.fp32_precision)
        if new_api
        else (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    )
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision, conv.fp32_precision = saved
        else:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        if torch.get_float32_matmul_precision() != matmul_precision:
            torch.set_float32_matmul_precision(matmul_precision)


# ---------------------------------------------------------------------------------- compile


def compile_unavailable_reason(device, backend="inductor"):
    """
    :return: why torch.compile cannot work for `device` here, or None when it should.
    """
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        from torch import _dynamo
    except Exception as exc:  # a broken install must not stop the run
        return f"torch._dynamo does not import ({type(exc).__name__}: {exc})"
    if not _dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if backend != "inductor":
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton (torch.compile's GPU code generator) is not installed"
    elif kind == "cpu":
        try:
            from torch._inductor import cpp_builder

            cpp_builder.get_cpp_compiler()
        except Exception as exc:
            return f"no C++ compiler for torch.compile on CPU ({type(exc).__name__})"
    return None


def compile_model(model, enabled=True, *, fullgraph=False, dynamic=None, mode=None, backend="inductor"):
    """
    Compile `model`'s forward with torch.compile, in place: the module, its parameters,
    state-dict keys, hooks and any DistributedDataParallel wrapping stay as they are. When
    compilation is unavailable, or fails on a first call, one line is logged and the model runs
    eagerly instead.

    Compilation happens at the first call of each new input signature, so convert dtypes
    (convert_to_fp16 / convert_to_bf16) and move the model before or after this, as you like.

    :param model: an nn.Module.
    :param enabled: False returns the model untouched (for --compile False).
    :param fullgraph, dynamic, mode, backend: passed to torch.compile.
    :return: the same model.
    """
    if not enabled:
        return model
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    reason = compile_unavailable_reason(device, backend)
    if reason is not None:
        logger.log(f"--compile True: {reason}; running eagerly")
        return model
    options = dict(fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend)
    model.forward = _CompiledForward(model, options)
    return model


def is_compiled(model):
    """True while `model` runs a compiled forward (compile_model was applied and has not failed)."""
    forward = model.__dict__.get("forward")
    return isinstance(forward, _CompiledForward) and not forward.failed


class _CompiledForward:
    """
    A module's forward, run through torch.compile until that fails once, then eagerly.

    Stored as the module's `forward` attribute (nn.Module.__call__ looks it up on the instance),
    so nothing about the module's structure changes.
    """

    def __init__(self, module, options):
        self.module = module
        self.options = options
        self.failed = False
        self.compiled = torch.compile(type(module).forward, **options)

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(self.module, *args, **kwargs)
            except Exception as exc:
                self.failed = True
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                logger.log(
                    f"--compile True: torch.compile failed ({type(exc).__name__}: {first_line}); "
                    "running eagerly"
                )
        # Run the class's own forward; an error that was not the compiler's surfaces here.
        return type(self.module).forward(self.module, *args, **kwargs)

    def __deepcopy__(self, memo):
        # A copied module (e.g. an EMA copy) gets its own compiled forward, bound to the copy.
        clone = copy.copy(self)
        clone.module = copy.deepcopy(self.module, memo)
        clone.compiled = torch.compile(type(self.module).forward, **self.options)
        return clone

    def __getstate__(self):
        raise TypeError("a compiled model cannot be pickled; pickle its state_dict() instead")
