"""The trainer spine: ONE loop for every program that trains something (`Trainer(task, ...).run()`).

A program supplies a `Task` (its model and loss: how to init the state, the step, the data, the
shardings); the spine does the rest, the same way for De-Diffusion and the world's pre-training:

  mesh ─► frozen tree placed ONCE (never donated) ─► state BORN sharded
  (jax.eval_shape -> shardings -> jax.jit(init, out_shardings)) or restored from the workdir's latest
  orbax checkpoint (state + data iterator + the task's JSON items) ─► step compiled ahead of time with
  the state donated (compile seconds, FLOPs, memory logged) ─► steps, with metrics.jsonl + TensorBoard
  + a progress line (ETA, images/s, step time), the task's evaluators where due (eval/NAME/KEY scalars
  and images), periodic and final async checkpoints; SIGTERM/SIGINT finish the step, save, return.

Determinism: step n gets rng `key(task.rng_seed)` (the step function folds in the state's step) and
the n-th batch of a checkpointed data iterator, so a stopped and resumed run reproduces the
uninterrupted run. A program whose batch of step n is a pure function of (seed, n) wraps that
function in `StepIndexedIterator`, checkpointed like a grain iterator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dediffusion_jax.evaluation import evaluators as evaluators_lib
from dediffusion_jax.parallel import multihost
from dediffusion_jax.parallel.mesh import make_mesh, replicated
from dediffusion_jax.train import checkpoint as ckpt_lib, metrics as metrics_lib, step as step_lib
from dediffusion_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# What a program supplies


@dataclasses.dataclass
class Task:
    """One program's model and loss, as the spine needs them. Nothing here holds device arrays.

    init:          (key, init_inputs) -> state: a pytree with a `step` (attribute or "step" key) and
                   whatever else it needs (params, opt_state, ema). Called under jit with
                   out_shardings, so the state is born sharded.
    step_fn:       (state, frozen, batch, rng) -> (state, metrics); pure, jitted here with the state
                   donated. `rng` is the same every step: fold in the state's step.
    data:          an iterator of host-local batches with get_state()/set_state() (a grain iterator,
                   or a StepIndexedIterator); its position is saved with every checkpoint.
    example_batch: {name: jax.ShapeDtypeStruct} of the GLOBAL batch the step sees (AOT compilation).
    seed:          the init key is key(seed). rng_seed: the step rng is key(rng_seed).
    state_shardings: (abstract_state, mesh) -> shardings; default: everything replicated.
    frozen:        a host pytree of frozen weights (placed once, never donated) or None.
    frozen_shardings: (frozen, mesh) -> shardings; default: replicated.
    init_inputs:   a host pytree passed to `init` (e.g. pretrained weights), placed with
                   `init_input_shardings(state_shardings)` (default: replicated); only on a fresh start.
    to_device:     host-local batch -> {name: np.ndarray} of the fields the step reads.
    view:          (state, frozen) -> what evaluators get (e.g. an object with .texts(images)).
    evaluators:    objects with name, every_steps, run(view) -> EvalResult (evaluation/evaluators.py).
    checkpoint_json: () -> {item: JSON dict} saved with each checkpoint (e.g. config, decoder identity).
    check_checkpoint: (read_json(item) -> dict, step) -> None; raises CheckpointError subclasses
                   before a restore (e.g. DecoderMismatchError).
    after_step:    (step, state, frozen, local_batch, device_batch, writer) -> None on every process
                   after each step (e.g. sample texts); writer only writes on process 0.
    on_fresh_start: () -> None on process 0 when the run starts from scratch, and after a resume that
                   accepted config changes (e.g. write config.json).
    config_item:   the JSON item (of checkpoint_json) holding the run's config: a resume compares it
                   with the checkpoint's and refuses a change outside `free_keys` and
                   Settings.allow_changes (ConfigChangedError, one line naming each key). None: no check.
    free_keys:     config keys or groups ('log') that may change on a resume: logging, how often to
                   save, evaluators; nothing that alters the optimisation or the data stream.
    """

    init: Callable[[jax.Array, Any], Any]
    step_fn: Callable[[Any, Any, dict, jax.Array], tuple[Any, dict]]
    data: Any
    example_batch: dict[str, jax.ShapeDtypeStruct]
    seed: int = 0
    rng_seed: int = 1
    state_shardings: Callable[[Any, Mesh], Any] | None = None
    frozen: Any = None
    frozen_shardings: Callable[[Any, Mesh], Any] | None = None
    init_inputs: Any = None
    init_input_shardings: Callable[[Any], Any] | None = None
    to_device: Callable[[Any], dict[str, np.ndarray]] | None = None
    view: Callable[[Any, Any], Any] | None = None
    evaluators: list[Any] = dataclasses.field(default_factory=list)
    checkpoint_json: Callable[[], dict[str, dict]] | None = None
    check_checkpoint: Callable[[Callable[[str], dict], int], None] | None = None
    after_step: Callable[..., None] | None = None
    on_fresh_start: Callable[[], None] | None = None
    config_item: str | None = None
    free_keys: tuple[str, ...] = ()

    @property
    def json_items(self) -> tuple[str, ...]:
        return tuple(self.checkpoint_json()) if self.checkpoint_json is not None else ()


@dataclasses.dataclass
class Settings:
    """How long to train and how often to log, evaluate and save."""

    total_steps: int
    log_every: int = 1                 # metrics.jsonl / TensorBoard every N steps (and the last)
    progress_every: int = 100          # console line every N steps (and the last)
    checkpoint_every: int = 0          # save every N steps (0: only at the end / on a stop)
    checkpoint_minutes: float = 0.0    # also save when this many minutes passed since the last save
    keep: int = 3
    async_save: bool = True
    tensorboard: bool = True
    stop_after_steps: int = 0          # this invocation saves and returns after N steps (0: no limit)
    stop_after_minutes: float = 0.0    # ... or after this many minutes (0: no limit)
    allow_changes: tuple[str, ...] = ()  # config keys a resume may change (the user's opt-in)
    allow_changes_flag: str = "--config.resume.allow_changes"  # how the user opts in (error text)


class StepIndexedIterator(Iterator):
    """Batches that are a pure function of the step, `batch_fn(step)`, behind a grain-like iterator.

    get_state()/set_state() carry the next step as JSON bytes (what grain's checkpoint handler writes
    for a non-DatasetIterator), so it is checkpointed exactly like the De-Diffusion data pipeline.
    """

    def __init__(self, batch_fn: Callable[[int], Any], start: int = 0):
        self.batch_fn = batch_fn
        self.step = int(start)

    def __iter__(self) -> "StepIndexedIterator":
        return self

    def __next__(self) -> Any:
        batch = self.batch_fn(self.step)
        self.step += 1
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"step": self.step}).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        self.step = int(state["step"])

    def start_prefetch(self) -> None:  # grain's restore calls it
        pass


# ---------------------------------------------------------------------------------------------------
# Helpers


def place(tree: Any, shardings: Any) -> Any:
    """Host arrays that exist in full on every process -> global arrays (works multi-process)."""
    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: replicated(mesh), tree)


def step_of(state: Any) -> Any:
    return state["step"] if isinstance(state, dict) else state.step


def example_of(batch: Any) -> Any:
    """ShapeDtypeStructs of a (global) host batch: the example a Task compiles its step for."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)


def adam(peak: float, end: float, warmup: int, total: int, *, weight_decay: float = 0.0,
         clip: float = 1.0) -> Any:
    """The core optimizer (train/optimizer.py) as a small program wants it: clip(global norm) ->
    Adam (+ decoupled weight decay on kernels) -> warmup-cosine learning rate (0 -> peak -> end)."""
    import ml_collections

    from dediffusion_jax.train import optimizer as optimizer_lib

    return optimizer_lib.make_optimizer(ml_collections.ConfigDict({
        "optimizer": {"name": "adamw", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                      "weight_decay": float(weight_decay), "grad_clip_norm": float(clip)},
        "lr": {"schedule": "warmup_cosine", "peak": float(peak), "end": float(end),
               "warmup_steps": int(warmup)},
        "total_steps": max(int(total), int(warmup) + 1)}))


def single_device_mesh() -> Mesh:
    """A 1-device mesh: the world programs' default (small models, batch sizes of any value)."""
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


class StopFlag:
    """SIGTERM/SIGINT -> finish the current step, save, return. Agreed across processes."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: finishing this step, saving a checkpoint, exiting", signum)
        self.requested = True

    def agreed(self, *local: bool) -> tuple[bool, ...]:
        """(stop requested, *local flags) OR-ed over processes (each process may see its own)."""
        flags = np.asarray([self.requested, *local], np.int32)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = np.any(np.asarray(multihost_utils.process_allgather(flags)), axis=0)
        return tuple(bool(f) for f in flags)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _default_to_device(batch: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """`Trainer(task, workdir, settings, mesh).run()` -> summary dict; `.state` is the final state.

    Raises CheckpointError when the workdir's checkpoint cannot be used; never starts afresh then.
    """

    def __init__(self, task: Task, workdir: str | Path, settings: Settings, mesh: Mesh | None = None):
        self.task, self.settings = task, settings
        self.workdir = Path(workdir).expanduser().resolve()
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.state: Any = None
        self.frozen: Any = None

    # -- pieces, usable on their own (e.g. an export restores without training) --

    def _manager(self):
        return ckpt_lib.make_manager(self.workdir, keep=int(self.settings.keep),
                                     async_save=bool(self.settings.async_save),
                                     item_names=("state", "data", *self.task.json_items))

    def _shardings(self) -> tuple[Any, Any]:
        abstract = jax.eval_shape(self.task.init, jax.random.key(self.task.seed), self.task.init_inputs)
        if self.task.state_shardings is not None:
            return abstract, self.task.state_shardings(abstract, self.mesh)
        return abstract, replicated_shardings(abstract, self.mesh)

    def _place_frozen(self) -> tuple[Any, Any]:
        if self.task.frozen is None:
            return None, None
        sh = (self.task.frozen_shardings(self.task.frozen, self.mesh) if self.task.frozen_shardings
              else replicated_shardings(self.task.frozen, self.mesh))
        return place(self.task.frozen, sh), sh

    def latest_step(self) -> int | None:
        """The step of the workdir's latest checkpoint (None: a fresh start)."""
        manager = self._manager()
        try:
            return manager.latest_step()
        finally:
            manager.close()

    def restore_latest(self, step: int | None = None) -> Any | None:
        """The state of the latest (or the given) checkpoint, sharded; None when there is none.
        The data iterator is left where it is."""
        manager = self._manager()
        try:
            step = manager.latest_step() if step is None else step
            if step is None:
                return None
            self._check(manager, step)
            abstract, sh = self._shardings()
            return ckpt_lib.restore(manager, step, ckpt_lib.abstract_with_shardings(abstract, sh), None)
        finally:
            manager.close()

    def _check(self, manager, step: int) -> None:
        if self.task.check_checkpoint is not None:
            self.task.check_checkpoint(lambda item: ckpt_lib.read_json(manager, step, item), step)

    def _check_config(self, manager, step: int) -> dict[str, tuple[Any, Any]]:
        """The config changes this resume accepts; ConfigChangedError for any other."""
        item = self.task.config_item
        if item is None or self.task.checkpoint_json is None:
            return {}
        return ckpt_lib.check_config(
            ckpt_lib.read_json(manager, step, item), self.task.checkpoint_json()[item], step=step,
            directory=manager.directory, free=tuple(self.task.free_keys),
            allowed=tuple(self.settings.allow_changes), opt_in=self.settings.allow_changes_flag)

    def _record(self, event: str, step: int, **extra: Any) -> None:
        """One line of WORKDIR/history.jsonl: every start and resume, with the changes it accepted."""
        import os
        import socket

        row = {"event": event, "step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "host": socket.gethostname(), "pid": os.getpid(), **extra}
        with open(self.workdir / "history.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def run(self) -> dict[str, Any]:
        """Trains to total_steps (or a stop) holding the workdir's lock (process 0; a second run on
        the workdir is refused, WorkdirLockedError). SIGTERM/SIGINT at any point, the first compile
        included, ends the run with a message (and a checkpoint once a step ran)."""
        is_main = jax.process_index() == 0
        lock = workdir_lib.WorkdirLock(self.workdir)
        locked, error = True, ""
        if is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire()
            except workdir_lib.WorkdirLockedError as e:
                locked, error = False, str(e)
        if jax.process_count() > 1:  # every process stops when process 0 could not lock
            from jax.experimental import multihost_utils

            locked = bool(multihost_utils.broadcast_one_to_all(np.int32(locked)))
        if not locked:
            raise workdir_lib.WorkdirLockedError(error or f"{self.workdir} is in use by another run "
                                                 "(process 0 could not take its lock)")
        stop = StopFlag()
        try:
            return self._run(stop)
        finally:
            stop.restore()
            lock.release()

    def _run(self, stop: "StopFlag") -> dict[str, Any]:
        task, settings, mesh = self.task, self.settings, self.mesh
        is_main = jax.process_index() == 0
        total = int(settings.total_steps)
        example = task.example_batch
        global_batch = int(next(iter(jax.tree.leaves(example))).shape[0])
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if global_batch % shards:
            raise ValueError(f"batch_size {global_batch} is not a multiple of the data x fsdp mesh size "
                             f"{shards}")

        frozen, frozen_sh = self._place_frozen()
        abstract, state_sh = self._shardings()
        if is_main:
            for folder in workdir_lib.incomplete_checkpoints(ckpt_lib.checkpoint_dir(self.workdir)):
                log.warning("incomplete checkpoint %s (a save cut short, e.g. by SIGKILL): not used; "
                            "resuming from the last complete one", folder)
        manager = self._manager()
        data_iter = task.data
        latest = manager.latest_step()
        accepted: dict[str, tuple[Any, Any]] = {}
        if latest is not None:
            self._check(manager, latest)
            accepted = self._check_config(manager, latest)
            state = ckpt_lib.restore(manager, latest, ckpt_lib.abstract_with_shardings(abstract, state_sh),
                                     data_iter)
            log.info("resumed from step %d of %s", int(jax.device_get(step_of(state))), manager.directory)
        else:
            inputs = task.init_inputs
            if inputs is not None:
                inputs_sh = (task.init_input_shardings(state_sh) if task.init_input_shardings
                             else replicated_shardings(inputs, mesh))
                inputs = place(inputs, inputs_sh)
            state = jax.jit(task.init, out_shardings=state_sh)(jax.random.key(task.seed), inputs)
            if is_main and task.on_fresh_start is not None:
                task.on_fresh_start()
        start_step = int(jax.device_get(step_of(state)))
        if is_main:
            if accepted:
                log.warning("resuming with config changes (accepted): %s", "; ".join(
                    f"{k}: {a} -> {b}" for k, (a, b) in accepted.items()))
                if task.on_fresh_start is not None:
                    task.on_fresh_start()  # config.json shows the values the run goes on with
            self._record("resume" if latest is not None else "start", start_step,
                         **({"config_changes": {k: list(v) for k, v in accepted.items()}} if accepted else {}))

        # The first batch before the compile: a source that yields nothing usable (every file broken)
        # is reported at once, not after minutes of compiling. Nothing is saved before step 1
        # consumes it, so a checkpoint's data position is the same as without the early fetch.
        first_local = next(data_iter) if start_step < total else None
        # The step, compiled ahead of time for the global batch shape, the state donated.
        rng = jax.jit(lambda: jax.random.key(task.rng_seed), out_shardings=replicated(mesh))()
        fns = step_lib.compile_step(task.step_fn, state, state_sh, frozen, frozen_sh, example, mesh, rng)
        to_device = task.to_device or _default_to_device
        if stop.agreed()[0]:  # a signal during the compile: nothing trained since the last save
            log.warning("stopped by signal before the first step (at step %d); nothing to save", start_step)
            manager.close()
            self.state, self.frozen = state, frozen
            return {"start_step": start_step, "step": start_step, "preempted": True, "seconds": 0.0,
                    "steps_per_s": 0.0, "compile_seconds": fns.compile_seconds,
                    "flops_per_step": fns.flops_per_step, "final": {}}

        writer = metrics_lib.MetricWriter(self.workdir, enabled=is_main, tensorboard=bool(settings.tensorboard),
                                          resume_from=start_step if latest is not None else -1)
        if is_main and start_step == 0:
            writer.write_scalars(0, {"compile_seconds": fns.compile_seconds,
                                     "gflops_per_step_per_device": (fns.flops_per_step or 0) / 1e9})
        timer = metrics_lib.StepTimer(global_batch, jax.device_count(), fns.flops_per_step)
        progress = metrics_lib.Progress(total, int(settings.progress_every), start_step)
        every = int(settings.checkpoint_every)
        last_saved = start_step if latest is not None else -1
        last_save_time = time.perf_counter()
        pending: tuple[int, Any, float | None] | None = None
        step = start_step
        last_scalars: dict[str, float] = {}
        log_every = int(settings.log_every)

        def flush() -> None:
            nonlocal pending, last_scalars
            if pending is None:
                return
            n, m, skipped = pending
            pending = None
            scalars = metrics_lib.to_floats(jax.device_get(m))
            scalars.update(timer.lap())
            if skipped is not None:
                scalars["data_skipped"] = float(skipped)
            last_scalars = scalars
            if log_every and (n % log_every == 0 or n == total):
                writer.write_scalars(n, scalars)
            line = progress.maybe_log(n, scalars)
            if line and is_main:
                print(line, flush=True)

        def save(n: int) -> None:
            nonlocal last_saved, last_save_time
            if n == last_saved:
                return
            multihost.sync_global_devices(f"save_{n}")
            items = task.checkpoint_json() if task.checkpoint_json is not None else {}
            ckpt_lib.save_items(manager, n, state, data_iter, items)
            last_saved, last_save_time = n, time.perf_counter()

        def evaluate(n: int) -> None:
            if not any(evaluators_lib.due(ev, n, total) for ev in task.evaluators):
                return
            flush()
            view = task.view(state, frozen) if task.view is not None else state
            scalars, images = evaluators_lib.run_due(task.evaluators, n, total, view, log=log.info)
            if is_main:
                if scalars:
                    writer.write_scalars(n, scalars)
                if images:
                    writer.write_images(n, images)

        log.info("training steps %d -> %d, global batch %d on %d devices (%d processes)",
                 start_step, total, global_batch, jax.device_count(), jax.process_count())
        t_start = time.perf_counter()
        try:
            while step < total:
                local, first_local = (next(data_iter) if first_local is None else first_local), None
                batch = multihost.host_local_batch_to_global(mesh, to_device(local), fns.batch_sharding)
                state, m = fns.step(state, frozen, batch, rng)
                flush()  # the previous step's metrics, fetched while this step runs
                step += 1
                pending = (step, m, getattr(data_iter, "num_skipped", None))
                if task.after_step is not None:
                    task.after_step(step, state, frozen, local, batch, writer)
                evaluate(step)
                now = time.perf_counter()
                timed_save = bool(settings.checkpoint_minutes) and (
                    now - last_save_time > 60 * settings.checkpoint_minutes)
                out_of_time = bool(settings.stop_after_minutes) and now - t_start > 60 * settings.stop_after_minutes
                enough = bool(settings.stop_after_steps) and step - start_step >= settings.stop_after_steps
                stop_now, timed_save, out_of_time = stop.agreed(timed_save, out_of_time or enough)
                if (every and step % every == 0) or timed_save:
                    flush()
                    save(step)
                if stop_now or out_of_time:
                    flush()
                    save(step)
                    if stop_now:
                        log.warning("stopped by signal at step %d; checkpoint saved", step)
                    else:
                        log.info("stopped at step %d (this invocation's limit); checkpoint saved", step)
                    break
            flush()
            if step >= total:
                save(step)
            manager.wait_until_finished()
        finally:
            writer.close()
            manager.close()
        self.state, self.frozen = state, frozen
        seconds = time.perf_counter() - t_start
        summary = {"start_step": start_step, "step": step, "preempted": step < total,
                   "seconds": seconds, "steps_per_s": (step - start_step) / max(seconds, 1e-9),
                   "compile_seconds": fns.compile_seconds, "flops_per_step": fns.flops_per_step,
                   "final": last_scalars}
        if is_main:
            log.info("run summary: %s", json.dumps(summary, default=str))
        return summary
