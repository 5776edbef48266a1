"""
Progress of the sampling loops and solvers: each loop shows a bar of its own (progress=True), none
(False), or advances a bar it is given, so that a script can show one bar over the denoising
steps of a whole run, every batch included.
"""

from tqdm.auto import tqdm


def steps_with_progress(steps, progress, desc):
    """
    Iterate over a loop's steps showing progress: a bar of its own when progress is True, none
    when False, or one update(1) per step of a bar given as progress (anything with update(n),
    such as a tqdm over every batch of a sampling run). Only the bar's own counter is touched:
    nothing is read from the device, so a step never waits for the GPU.
    """
    if hasattr(progress, "update"):
        for step in steps:
            yield step
            progress.update(1)
    else:
        yield from tqdm(steps, disable=not progress, desc=desc)
