"""
Named model configurations for the benchmarks: "tiny" (CPU, seconds) and the paper's models with
the flags of the reference README (run them on a GPU with --device cuda), and the fields that
open every record of bench_sample.py and bench_train.py.
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
    # Attention-heavy at a size a CPU can run: attention at 32x32 (1024 tokens), 16x16 and 8x8,
    # with the reference's default head setting (4 heads, --num_head_channels -1: 16-channel heads
    # at 32x32, 32-channel heads below).
    "attn32": dict(
        image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2,2",
        attention_resolutions="32,16,8", num_heads=4, num_head_channels=-1, learn_sigma=True,
        class_cond=True, resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=1000,
        noise_schedule="cosine",
    ),
    # The same network with 64-channel heads (one head at 32x32): the least attention-heavy
    # split of the same attention layers.
    "attn32_1head": dict(
        image_size=32, num_channels=64, num_res_blocks=2, channel_mult="1,2,2,2",
        attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True, class_cond=True,
        resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=1000,
        noise_schedule="cosine",
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


# The noisy classifiers for guidance: the reference README's flags for the paper sizes (width
# 128, depth 4 at 64x64 and 2 above, attention pooling), a small one for the CPU configs.
_CLASSIFIER_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4), 32: (1, 2, 2, 2), 16: (1, 2),
}


def classifier_kwargs(name, image_size, use_fp16=False):
    """
    :return: EncoderUNetModel keyword arguments of the config's classifier (what
        create_classifier builds, written out so that sizes without its table work too).
    """
    paper = name.startswith("adm")
    width = 128 if paper else 64
    depth = 4 if name == "adm64" else 2
    resolutions = "32,16,8" if image_size >= 32 else "8"
    return dict(
        image_size=image_size, in_channels=3, model_channels=width, out_channels=1000,
        num_res_blocks=depth,
        attention_resolutions=tuple(image_size // int(r) for r in resolutions.split(",")),
        channel_mult=_CLASSIFIER_CHANNEL_MULT[image_size], use_fp16=use_fp16,
        num_head_channels=64 if image_size >= 32 else 16, use_scale_shift_norm=True,
        resblock_updown=True, pool="attention",
    )


def peak_memory_tracker(device):
    """
    Start tracking peak memory; the returned function gives the peak (MB) since then. On CUDA the
    peak allocated memory; on Linux CPUs the peak resident set (reset through
    /proc/self/clear_refs), elsewhere the process's lifetime peak (see .kind).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

        def read():
            return torch.cuda.max_memory_allocated(device) / 2**20

        read.kind = "cuda_max_allocated"
        return read
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set

        def read():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
            raise OSError("no VmHWM")

        read()
        read.kind = "rss_peak_during_run"
        return read
    except OSError:

        def read():
            return peak_memory_mb(device)

        read.kind = "rss_peak_of_process"
        return read


def run_record(bench, args, model, device, **measured):
    """
    One JSON record of a bench_sample/bench_train run: what ran and how (their shared flags,
    whether torch.compile took, the threads, the peak memory so far), then the measurements.
    """
    import torch

    from guided_diffusion.runtime.perf import is_compiled

    return {
        "bench": bench, "config": args.config, "device": str(device),
        "batch_size": args.batch_size, "use_fp16": args.use_fp16, "use_bf16": args.use_bf16,
        "compile": args.compile, "compiled": is_compiled(model), "channels_last": args.channels_last,
        "peak_mem_mb": peak_memory_mb(device), "threads": torch.get_num_threads(), **measured,
    }


def peak_memory_mb(device):
    """Peak memory of this process: CUDA max allocated on GPU, else the max RSS."""
    import resource
    import sys

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
