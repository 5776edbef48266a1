"""
Named model configurations for the benchmarks: "tiny" (CPU, seconds) and the paper's models with
the flags of the reference README (run them on a GPU with --device cuda).
"""

from guided_diffusion.script_util import model_and_diffusion_defaults

_PAPER_COMMON = dict(
    attention_resolutions="32,16,8",
    learn_sigma=True,
    num_head_channels=64,
    resblock_updown=True,
    use_scale_shift_norm=True,
    diffusion_steps=1000,
)

CONFIGS = {
    "tiny": dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="8", num_head_channels=16, learn_sigma=True, class_cond=True,
        diffusion_steps=100,
    ),
    "digits32": dict(
        image_size=32, num_channels=64, num_res_blocks=1, channel_mult="1,2,2",
        attention_resolutions="8", num_head_channels=32, learn_sigma=True, class_cond=True,
        diffusion_steps=1000, noise_schedule="cosine",
    ),
    "adm64": dict(_PAPER_COMMON, image_size=64, num_channels=192, num_res_blocks=3,
                  class_cond=True, noise_schedule="cosine", use_new_attention_order=True),
    "adm128": dict(_PAPER_COMMON, image_size=128, num_channels=256, num_res_blocks=2,
                   num_heads=4, class_cond=True),
    "adm256": dict(_PAPER_COMMON, image_size=256, num_channels=256, num_res_blocks=2,
                   class_cond=True),
    "adm256_uncond": dict(_PAPER_COMMON, image_size=256, num_channels=256, num_res_blocks=2,
                          class_cond=False),
    "adm512": dict(_PAPER_COMMON, image_size=512, num_channels=256, num_res_blocks=2,
                   class_cond=True),
}


def config_flags(name, num_classes=1000):
    """
    :return: the full create_model_and_diffusion flags of a named config.
    :raises ValueError: for an unknown name.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}: choose one of {', '.join(CONFIGS)}")
    flags = model_and_diffusion_defaults()
    flags.update(CONFIGS[name])
    flags["num_classes"] = 10 if name in ("tiny", "digits32") else num_classes
    return flags


def peak_memory_mb(device):
    """Peak memory of this process: CUDA max allocated on GPU, else the max RSS."""
    import resource
    import sys

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
