"""The grain input pipeline: deterministic, sharded per process, checkpointable, corruption-tolerant.

    source ─► index range ─► this process's shard [p::P] ─► shuffle (reseeded every epoch) ─► repeat
           ─► fetch + preprocess (guarded, per-example rng) ─► drop corrupt, count ─► batch (per process)
           ─► [worker processes] ─► DataIterator (numpy batches, skip counter, get_state/set_state)

Why these choices:
- strided shards (`[p::P]`) are disjoint, cover the data, differ in size by at most one, and stay
  representative when a source is sorted (image folders sorted by class);
- every random decision is a pure function of (seed, process, position), so the same seed gives
  the same batches, and a restored iterator continues with exactly the batch that would have come;
- a corrupt example is dropped BEFORE batching, so batches stay full; its count travels inside the
  batch (it works across worker processes) and the DataIterator adds it up into `num_skipped`,
  which is part of the checkpointed state.
Multi-host note: with num_epochs=None (the training default) every process streams forever; with a
finite num_epochs, shard sizes and skips differ between processes, so drive the loop by a fixed
step count (steps_per_epoch) rather than by exhausting the iterator.
Global arrays are assembled by dediffusion_jax.parallel.multihost.host_local_batch_to_global;
this module only yields host-local numpy batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from dediffusion_jax.data.preprocess import CorruptExampleError, Preprocessor, PreprocessConfig
from dediffusion_jax.data.sources import ImageSource, SourceSpecError
from dediffusion_jax.errors import UserError

log = logging.getLogger(__name__)

PreprocessFn = Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, Any]]

SKIPPED_KEY = "_num_skipped"   # per-example count of corrupt examples dropped just before it
LOG_FIRST_N_SKIPS = 10


class DataSourceError(UserError, RuntimeError):
    """Too many examples in a row failed to load: the source is wrong, not a few bad files."""


class _Skipped:
    """Marker for a corrupt example, replacing it in the stream until the skip stage drops it."""

    __slots__ = ("id", "reason")

    def __init__(self, id_: str, reason: str):
        self.id, self.reason = id_, reason


class _LoadAndPreprocess:
    """source[i] + preprocess_fn, guarded. Picklable (worker processes get a copy)."""

    def __init__(self, source: ImageSource, preprocess_fn: PreprocessFn, seed: int,
                 process_index: int):
        self.source, self.preprocess_fn = source, preprocess_fn
        self.seed, self.process_index = seed, process_index

    def __call__(self, position: int, source_index: int) -> Mapping[str, Any] | _Skipped:
        source_index = int(source_index)
        rid = f"index {source_index}"
        try:
            record = self.source[source_index]
            rid = str(record.get("id", rid))
            # One generator per (seed, process, stream position): epoch-dependent, resumable.
            rng = np.random.default_rng([self.seed, self.process_index, int(position)])
            return self.preprocess_fn(record, rng)
        # Decoding problems and unreadable files are data problems: skip. Anything else (a bug in
        # preprocess_fn) propagates: silently skipping every example would hide it.
        except (CorruptExampleError, OSError) as e:
            return _Skipped(rid, f"{type(e).__name__}: {e}")


class _DropSkippedIterator(grain.DatasetIterator):
    """Drops _Skipped markers; tags each kept example with how many were dropped before it."""

    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive
        self._logged = 0

    def __next__(self) -> dict[str, Any]:
        skipped = 0
        while True:
            element = next(self._parent)  # StopIteration ends the stream (finite epochs)
            if not isinstance(element, _Skipped):
                out = dict(element)
                out[SKIPPED_KEY] = np.int32(skipped)
                return out
            skipped += 1
            if self._logged < LOG_FIRST_N_SKIPS:
                self._logged += 1
                log.warning("skipping corrupt example %s (%s)%s", element.id, element.reason,
                            "; further skips are only counted" if
                            self._logged == LOG_FIRST_N_SKIPS else "")
            if skipped >= self._max_consecutive:
                raise DataSourceError(
                    f"{skipped} consecutive examples failed to load (last: {element.id}: "
                    f"{element.reason}); the source is probably wrong, not just a few bad files")

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _DropSkippedIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self) -> _DropSkippedIterator:
        return _DropSkippedIterator(self._parent.__iter__(), self._max_consecutive)


class DataIterator(grain.DatasetIterator):
    """Host-local numpy batches; `num_skipped` counts corrupt examples dropped so far.

    A grain DatasetIterator: `get_state()` is a JSON-able dict (pipeline position + skip count) that
    `set_state()` restores, so orbax's grain checkpoint handler and plain json both work.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self.num_skipped += int(np.sum(batch.pop(SKIPPED_KEY)))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "num_skipped": int(self.num_skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.num_skipped = int(state["num_skipped"])


class Dataset(grain.IterDataset):
    """What make_dataset returns: `iter(ds)` gives a fresh DataIterator (from the start)."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, steps_per_epoch: int):
        super().__init__(parent)
        self.batch_size = batch_size            # per process
        self.steps_per_epoch = steps_per_epoch  # full batches per epoch if nothing were corrupt

    def __iter__(self) -> DataIterator:
        return DataIterator(self._parent.__iter__())


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app (pytest, notebooks) nothing
    parsed them and grain raises UnparsedFlagAccessError. Marking them parsed keeps the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _per_process_seed(seed: int, process_index: int) -> int:
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def make_dataset(source: ImageSource, *, global_batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 preprocess_fn: PreprocessFn | None = None, worker_count: int = 0,
                 drop_remainder: bool = True, read_threads: int = 4,
                 max_consecutive_failures: int = 1000) -> Dataset:
    """Builds the per-process pipeline over `source`; `iter()` it for batches of dict[str, ndarray].

    Args:
      source: any random-access source (see sources.py).
      global_batch_size: summed over processes; each process yields global / process_count.
      seed: same seed -> same shuffle, same augmentation, same batches.
      shuffle: reshuffle every epoch (off for evaluation: source order, sharded).
      num_epochs: None streams forever (training); an int stops after that many passes.
      process_index / process_count: default jax.process_index() / jax.process_count(); pass them
        to simulate hosts in tests.
      preprocess_fn: `fn(record, rng) -> dict` of fixed-shape arrays / str; default Preprocessor()
        with PreprocessConfig() (224 CLIP backbone view, 256 decoder view). Raise
        CorruptExampleError (or OSError) to have an example skipped and counted.
      worker_count: >0 runs fetch + preprocess + batching in that many worker processes.
      drop_remainder: drop a final partial batch (finite epochs), keeping every batch full.
      read_threads: threads for fetch + preprocess in each (worker) process.
      max_consecutive_failures: raise after this many corrupt examples in a row (a wrong path or
        format, not a few bad files).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be None (forever) or positive, got {num_epochs}")
    batch_size = global_batch_size // process_count
    n = len(source)
    shard_len = len(range(process_index, n, process_count))
    if shard_len < batch_size and drop_remainder:
        raise SourceSpecError(f"this process's shard has {shard_len} examples (of {n}), fewer than one "
                         f"batch of {batch_size}")
    preprocess_fn = preprocess_fn or Preprocessor(PreprocessConfig())

    ds = grain.MapDataset.range(n)[process_index::process_count]
    if shuffle:
        # Per-epoch reseeding comes from repeat(): epoch e shuffles with a seed derived from e.
        ds = ds.shuffle(seed=_per_process_seed(seed, process_index))
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_LoadAndPreprocess(source, preprocess_fn, seed, process_index))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, 8)))
    it_ds = _DropSkippedIterDataset(it_ds, max_consecutive_failures)
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return Dataset(it_ds, batch_size=batch_size, steps_per_epoch=shard_len // batch_size)
