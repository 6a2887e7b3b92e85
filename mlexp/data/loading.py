"""From a dataset to batches: DataLoader settings, per-epoch augmentation seeds, and the
loader's own throughput (is the loader or the model the bottleneck?)."""

from __future__ import annotations

import gc
import os
import random
import time
from functools import cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mlexp.config import TrainConfig

PREFETCH_BATCHES = 2  

def loader_kwargs(cfg: TrainConfig, workers: int) -> dict:
    """Batches for an accelerator: `workers` decoding processes that live for the whole run
    (no re-fork each epoch), pinned memory on a GPU so copies can overlap compute."""
    kwargs = {"batch_size": cfg.batch_size, "num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        keep_inherited_objects_from_the_workers_collector()
        kwargs |= {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES}
    return kwargs


@cache  # once per process: each registration would run at every fork
def keep_inherited_objects_from_the_workers_collector() -> None:
    """Loader workers are forked while the tracker's threads work in SQLite (the outbox, an
    sqlite:// store). A worker whose garbage collector finalized a connection it inherited
    would take SQLite's memory lock, which one of those threads may have held at the instant
    of the fork, and wait forever: the training would stall on its first batch. So everything
    alive at a fork is moved out of the collector's reach just before it (gc.freeze): the
    child never collects it, and the parent takes it back right after (gc.unfreeze; both
    are O(1) list splices). The child's own objects are collected as usual.

    Except where a tracked run had frozen what was alive at its start (mlexp.tracking.run:
    a full collection would otherwise hold the GIL for 200 ms): unfreezing would undo that,
    so the parent keeps the objects of the fork frozen too (long-lived: the model, the
    optimizer, the loaders), until the run's end hands everything back."""
    if not hasattr(os, "register_at_fork"):
        return
    frozen_before = [0]

    def before() -> None:
        frozen_before[0] = gc.get_freeze_count()
        gc.freeze()

    def after_in_parent() -> None:
        if not frozen_before[0]:
            gc.unfreeze()

    os.register_at_fork(before=before, after_in_parent=after_in_parent)


class EpochSeeded(Dataset):
    """A training set whose random augmentations depend on (seed, epoch, image) only.

    With workers that persist across epochs, each worker's random stream would run on from
    epoch to epoch, so a run resumed at epoch k would see other crops than an uninterrupted
    one. Seeding each image from (seed, epoch, index) makes the crops the same whatever the
    number of workers and wherever the run restarted. The epoch lives in shared memory, so
    workers forked once see each new epoch; in the main process (no workers) the global
    random states are put back after each image, so training's own randomness is untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = (self.seed * 1_000_003 + int(self.epoch[0]) * 7_919 + index * 104_729) % 2**32
        in_worker = get_worker_info() is not None
        if not in_worker:
            states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed)
        # Augmentations draw from the CPU generator only. torch.manual_seed would also queue a
        # lazy seeding of every accelerator backend, with a captured stack trace each time: a
        # fifth of a loader worker's time per image.
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if not in_worker:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])


def loader_samples_per_s(dataset: Dataset, cfg: TrainConfig, workers: int, max_batches: int = 30,
                         max_seconds: float = 3.0, collate=None) -> float:
    """The loader alone (decoding and augmentation, no model): training images per second
    over up to `max_batches` batches or `max_seconds`, from the first batch on (worker
    start-up left out) when there are two or more. Next to perf/samples_per_s it says
    whether the loader or the model is the bottleneck. Random states are left as they were."""
    loader = DataLoader(dataset, shuffle=False, collate_fn=collate,
                        **{**loader_kwargs(cfg, workers), "persistent_workers": False})
    with torch.random.fork_rng(devices=[]):
        began = time.perf_counter()
        started, counted, first_batch = began, 0, 0
        for images, _ in loader:
            if not first_batch:
                first_batch, started = len(images), time.perf_counter()
                continue
            counted += len(images)
            if counted >= max_batches * cfg.batch_size or time.perf_counter() - started >= max_seconds:
                break
        if not counted:  # a single batch: its time is all there is
            counted, started = first_batch, began
        return counted / max(time.perf_counter() - started, 1e-9)
