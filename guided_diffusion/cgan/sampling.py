"""
What the cGAN's sampling and evaluation scripts share: the network flags come from the checkpoint,
which records them, instead of being asked for again.
"""

from ..cli.flags import checkpoint_flags
from ..errors import ScriptError
from .networks import cgan_defaults
from .training import load_cgan_checkpoint


def generator_flags(args, given):
    """
    The network flags of the checkpoint args.model_path, put into args (cgan_defaults() keys).

    :param args: the parsed flags (model_path and the cgan_defaults() flags).
    :param given: the flags given on the command line (cli.flags.explicit_flags).
    :return: {flag: value} to build the generator with.
    :raises ScriptError: without --model_path, or when a given flag contradicts the checkpoint.
    """
    if not args.model_path:
        raise ScriptError("pass --model_path pointing to a cgan%06d.pt checkpoint of cgan_train.py")
    saved = dict(load_cgan_checkpoint(args.model_path)["flags"])
    if saved.get("arch") == "mlp":
        saved.pop("conv_channels", None)  # the MLP networks have no convolutions
    # The keys that shape the weights, and --dropout, the rate --sample_dropout samples with.
    return checkpoint_flags(saved, args, given, tuple(cgan_defaults()), args.model_path)
