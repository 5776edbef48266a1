"""
Loading a checkpoint's weights into a network built from flags, refusing one that does not fit
with a message naming the flags to change. Training (resuming) and sampling both import it, so it
sits below both.
"""

from .. import dist_util
from ..errors import ScriptError
from ..unet import EncoderUNetModel
from .hints import explain_state_dict_mismatch


def check_model_weights(model, state_dict, path, flags=None, build=None):
    """
    Check that a checkpoint fits a network before loading it.

    :param model: the network built from the flags.
    :param state_dict: the loaded checkpoint.
    :param path: the checkpoint's file name (for messages).
    :param flags: the dict of flags the network was built from; with `build`, enables the search
        for the flag changes that make the checkpoint fit.
    :param build: a function flags -> network (called on the meta device: no memory, no init).
    :raises ScriptError: naming the flags to change when it does not fit.
    """
    problem = explain_state_dict_mismatch(model, state_dict, flags=flags, build=build)
    if problem:
        what = "classifier" if isinstance(model, EncoderUNetModel) else "model"
        raise ScriptError(f"checkpoint {path} does not fit the {what} flags: {problem}")


def load_model_weights(model, state_dict, path, flags=None, build=None):
    """
    check_model_weights, then load_state_dict(strict=True).
    """
    check_model_weights(model, state_dict, path, flags=flags, build=build)
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint_into(model, path, flags=None, build=None):
    """
    Read a model checkpoint (torch.load(weights_only=True)) and load it into `model`.

    :raises FileNotFoundError: when path is missing or empty.
    :raises ScriptError / ValueError: when it is corrupt or does not fit the flags.
    """
    if not path:
        raise ScriptError("no checkpoint given: pass --model_path (or --classifier_path) FILE")
    state = dist_util.load_state_dict(path, map_location="cpu")
    load_model_weights(model, state, path, flags=flags, build=build)


