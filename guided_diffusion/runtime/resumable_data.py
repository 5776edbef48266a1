"""
Endless batch streams whose position can be saved and restored, so that a resumed run reads the
very batches the interrupted run would have read next.

The order of an epoch is a pure function of (seed, rank, epoch): a permutation of the rank's items
(or the sorted order when not shuffling) and one seed per item for its random augmentations, both
drawn from numpy's SeedSequence([seed, rank, epoch]). A stream's position is then three numbers,
the epoch and how many batches of it were handed out (plus the seed), and `state_dict()` /
`load_state_dict()` save and restore it. Batches read ahead by loader workers do not count: the
position is what the consumer has taken.
"""

import atexit
import contextlib
import multiprocessing.util  # noqa: F401  (registers its exit hook before ours, see below)
import os
import random
import signal
import weakref

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import dist_util
from .signals import hold_preemption_signals, ignore_in_worker

STATE_FORMAT = "guided_diffusion.batches/1"

# Streams whose loader workers are running, and every worker process started (pruned as they
# end), with the pid of the process that started them.
_running = weakref.WeakSet()
_workers = []


def _track_workers(iterator):
    global _workers
    started = [(os.getpid(), w) for w in getattr(iterator, "_workers", None) or []]
    _workers = [(pid, w) for pid, w in _workers if pid == os.getpid() and w.is_alive()] + started


def _kill(worker):
    if worker.is_alive():
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=5)


@atexit.register
def _stop_workers():
    # The workers ignore SIGTERM (preemption.ignore_in_worker), and multiprocessing's own exit
    # hook stops daemon children with SIGTERM and then waits for them without a timeout. A loader
    # that is still open, or one collected with a reference cycle (e.g. held by an exception's
    # traceback: its queues are finalised before its stop message is sent), would leave a worker
    # that never ends that wait. Hooks run last registered first, so this one, registered after
    # multiprocessing's, stops them all before.
    for stream in list(_running):
        stream._close()
    for pid, worker in _workers:
        if pid == os.getpid():
            _kill(worker)


def default_seed():
    """
    The seed of a stream when none is given: torch's initial seed, which the training scripts set
    to --seed + rank (seed_training). Reading it draws nothing, so the stream does not shift the
    random numbers of the training loop.
    """
    return int(torch.initial_seed())


def epoch_order(seed, rank, epoch, num_items, shuffle=True):
    """
    The order and the augmentation seeds of one epoch.

    :param seed: the stream's seed (a non-negative int).
    :param rank: the rank whose items these are.
    :param epoch: the epoch (0, 1, ...).
    :param num_items: how many items the rank holds.
    :param shuffle: permute the items (else keep them in their order).
    :return: (order, item_seeds): int64 arrays of length num_items; item_seeds[i] belongs to
        item order[i].
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, rank, epoch]))
    order = rng.permutation(num_items) if shuffle else np.arange(num_items)
    item_seeds = rng.integers(0, 2**63 - 1, size=num_items, dtype=np.int64)
    return order.astype(np.int64), item_seeds


class _SeededItems(Dataset):
    """
    Items fetched by (index, seed): `random` is seeded with the item's seed while the wrapped
    dataset builds the item, so its augmentations (ImageDataset's crop and flip draw from
    `random`) depend on the item's place in the stream, not on which worker read it or when.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        # Also restored in the main process (num_workers=0), where `random` is the user's.
        saved = random.getstate()
        random.seed(int(seed))
        try:
            return self.dataset[int(index)]
        finally:
            random.setstate(saved)


class ResumableBatches:
    """
    An endless iterator of batches from a map-style dataset, drop_last, with a saveable position.

    :param dataset: a map-style dataset (e.g. ImageDataset holding this rank's shard).
    :param batch_size: items per batch.
    :param shuffle: permute each epoch (else the dataset's order, every epoch).
    :param seed: the stream's seed; None: default_seed().
    :param rank: mixed into the order (default: this process's rank), so shards are shuffled
        independently.
    :param num_workers: loader worker processes (as torch's DataLoader).
    """

    def __init__(self, dataset, batch_size, *, shuffle=True, seed=None, rank=None, num_workers=1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"{len(dataset)} items cannot fill a batch of {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = default_seed() if seed is None else int(seed)
        self.rank = dist_util.get_rank() if rank is None else int(rank)
        self.num_workers = num_workers
        self.epoch = 0
        self.offset = 0  # batches of this epoch handed out
        self._batches = None

    @property
    def batches_per_epoch(self):
        return len(self.dataset) // self.batch_size

    def __iter__(self):
        return self

    def __next__(self):
        if self.offset >= self.batches_per_epoch:
            self._close()
            self.epoch += 1
            self.offset = 0
        if self._batches is None:
            loader = self._loader(self.epoch, self.offset)
            # The workers start here (every epoch): with the preemption signals blocked until
            # each has set them to be ignored (see runtime.signals), so a signal to the process
            # group at this moment cannot kill one.
            with hold_preemption_signals() if self.num_workers else contextlib.nullcontext():
                self._batches = iter(loader)
            _running.add(self)
            _track_workers(self._batches)
        try:
            batch = next(self._batches)
        except BaseException:
            # Stop the workers now, while the loader is whole (a loader left to the garbage
            # collector inside an exception's reference cycle cannot stop them); a later call
            # starts a new loader at the same position, retrying this batch.
            self._close()
            raise
        self.offset += 1
        return batch

    def _loader(self, epoch, offset):
        order, item_seeds = epoch_order(
            self.seed, self.rank, epoch, len(self.dataset), self.shuffle
        )
        keys = list(zip(order.tolist(), item_seeds.tolist()))
        size = self.batch_size
        batches = [
            keys[start : start + size]
            for start in range(offset * size, self.batches_per_epoch * size, size)
        ]
        # A generator of its own: otherwise every epoch's loader would draw its workers' base
        # seed from torch's global generator and shift the training loop's random numbers.
        worker_seed = np.random.SeedSequence([self.seed, self.rank, epoch, 1]).generate_state(1)
        generator = torch.Generator().manual_seed(int(worker_seed[0]))
        return DataLoader(
            _SeededItems(self.dataset),
            batch_sampler=batches,
            num_workers=self.num_workers,
            generator=generator,
            worker_init_fn=ignore_in_worker if self.num_workers else None,
        )

    def close(self):
        """
        Stop the loader's workers now (the position is kept: a later next() starts a new loader
        there). A loader left to the garbage collector inside a reference cycle cannot stop its
        workers in time, and the collection then waits for them (seconds per worker).
        """
        self._close()

    def _close(self):
        batches, self._batches = self._batches, None
        _running.discard(self)
        # Sends the workers their stop sentinel and joins them (dropping the last reference
        # would do the same, but a traceback may hold another one).
        shutdown = getattr(batches, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        # A worker still busy after the loader's grace period ignores the SIGTERM the loader
        # sends it: end it for sure.
        for worker in getattr(batches, "_workers", None) or []:
            _kill(worker)

    def state_dict(self):
        """The position: plain values, loadable with torch.load(weights_only=True)."""
        return dict(
            format=STATE_FORMAT,
            seed=self.seed,
            rank=self.rank,
            epoch=self.epoch,
            offset=self.offset,
            num_items=len(self.dataset),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
        )

    def load_state_dict(self, state):
        """
        Continue from a saved position.

        :raises ValueError: when the position belongs to a different stream (another number of
            items, batch size or shuffling); the caller decides whether to restart instead.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a saved batch-stream position")
        mine = self.state_dict()
        for key in ("num_items", "batch_size", "shuffle"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"the saved data position is for {key}={state[key]} but this run has "
                    f"{key}={mine[key]}"
                )
        self._close()
        self.seed = int(state["seed"])
        self.rank = int(state["rank"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])


class MappedBatches:
    """
    A batch stream with a function applied to every batch, keeping the stream's state_dict.

    :param batches: an iterator of batches (a ResumableBatches keeps its position resumable).
    :param fn: called as fn(*batch) when the batch is a tuple or list, else fn(batch).
    """

    def __init__(self, batches, fn):
        self.batches = batches
        self.fn = fn

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        return self.fn(*batch) if isinstance(batch, (tuple, list)) else self.fn(batch)

    def state_dict(self):
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def close(self):
        """Close the underlying stream, if it can be (ResumableBatches.close)."""
        close = getattr(self.batches, "close", None)
        if callable(close):
            close()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)
