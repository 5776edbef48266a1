"""
Every exception the package raises on purpose, in one place, so that the scripts' entry point
(cli.main.run_main) can tell "change your input" (exit status 2, one line) from a bug (a
traceback), and so that any module, however low, can raise them: this module imports nothing.

- Bad input (the message says what to change): ScriptError and the other ValueError subclasses.
- Storage the user must fix (disk full, permissions): StorageError and its subclasses.
- A run that must stop: NonFiniteLossError; TrainingPreempted and SamplingPreempted (exit status
  EXIT_PREEMPTED, or EXIT_INTERRUPTED for a training run stopped by Ctrl-C).
"""

# os.EX_TEMPFAIL, "try again later": a job script requeues on it.
EXIT_PREEMPTED = 75
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


class ScriptError(ValueError):
    """Bad input to a script or a library call; the message says what to change."""


class UnknownScheduleError(ValueError, NotImplementedError):
    """
    A noise schedule name we do not know. Also a NotImplementedError, which is what the reference
    raised, so existing ``except NotImplementedError`` handlers keep working.
    """


class UnreadableImageError(ValueError):
    """An image file in the dataset could not be decoded (the message names the file)."""


class LauncherMismatchError(ValueError):
    """The launcher started N processes, but MPI (through mpi4py) sees a job of another size."""


class LogFolderInUseError(ScriptError):
    """Another live training job holds the log folder (runtime.log_folder)."""


class StorageError(OSError):
    """A file or folder the run needs cannot be written; the message says what was kept."""


class CheckpointWriteError(StorageError):
    """A checkpoint could not be written (disk full, no permission, ...); the message says what
    was kept."""


class UnwritableLogDirError(StorageError):
    """The log folder cannot be created or written."""


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or, in fp16, the loss scale) stopped being finite."""


class RunStopped(SystemExit):
    """
    A run that stopped on a signal after keeping its work; leaves with `status`.

    :param message: what was kept and how to continue (also in the log).
    :param status: the exit status.
    """

    def __init__(self, message, status=EXIT_PREEMPTED):
        super().__init__(status)
        self.message = message

    def __str__(self):
        return self.message


class TrainingPreempted(RunStopped):
    """
    Training stopped on SIGTERM/SIGUSR1 (exit status EXIT_PREEMPTED) or Ctrl-C (EXIT_INTERRUPTED)
    after saving a checkpoint.

    :param message: where the checkpoint is (also in the log).
    :param checkpoint: its path (the model file; None on ranks other than 0 is fine).
    :param status: the exit status.
    """

    def __init__(self, message, checkpoint=None, status=EXIT_PREEMPTED):
        super().__init__(message, status)
        self.checkpoint = checkpoint


class SamplingPreempted(RunStopped):
    """
    A sampling or editing run stopped on SIGTERM, SIGUSR1 or SIGINT after its current batch,
    with its finished batches kept; exits with EXIT_PREEMPTED.

    :param message: how many results are kept and how to continue (also in the log).
    :param kept: that count.
    """

    def __init__(self, message, kept=0):
        super().__init__(message, EXIT_PREEMPTED)
        self.kept = kept


class ImageChannelsError(ValueError):
    """A data file has another channel count than --in_channels (the message names the file)."""
