"""
What the benchmark scripts share around their measurements: the command-line entry point (bad
input is one `error:` line, not a traceback), one JSON line per run, the device and the timed part of a run.

It imports nothing from guided_diffusion: bench_compare's parent process must leave the choice of
implementation to its workers.
"""

import json
import sys
import time


def run_cli(main):
    """Call main(); a ValueError ends the process with its message on one line and status 2."""
    try:
        main()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def print_runs(run, args):
    """Print run(args) as one JSON line per --repeat, flushed so a reader sees each at once."""
    for _ in range(args.repeat):
        print(json.dumps(run(args)), flush=True)


def bench_device(name):
    """torch.device(name); a CUDA device without a visible GPU is refused (ValueError)."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible")
    return device


def timed(device, work):
    """
    Call work() once under the clocks. On CUDA the queue is drained before and after (so the
    time is the kernels', not their launches') and the peak memory statistics start afresh.

    :return: (wall seconds, CPU seconds of this process).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cpu0, t0 = time.process_time(), time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - cpu0
