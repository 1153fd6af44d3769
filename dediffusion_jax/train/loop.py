"""The training loop: `train_and_evaluate(config, workdir)`.

One program for every machine:
  mesh (config.mesh) ─► decoder loaded ONCE, frozen tree (+ frozen backbone) placed on the mesh ONCE
  ─► train state BORN sharded (or restored from the workdir's latest checkpoint, sharded)
  ─► step compiled ahead of time (compile time, FLOPs, memory logged)
  ─► per-process grain shards ─► global batch (multihost.host_local_batch_to_global) ─► step ...
with metrics every step, samples every M steps, async checkpoints every K steps and at the end, and
SIGTERM (pre-emption) handled by finishing the current step, saving and returning normally.

Determinism: step n uses rng fold_in(key(seed + 1), n) and the n-th batch of a seeded, checkpointed
data iterator, so a resumed run reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dediffusion_jax import extensions
from dediffusion_jax.data import pipeline, preprocess, sources
from dediffusion_jax.parallel import multihost, sharding as sharding_lib
from dediffusion_jax.parallel.mesh import make_mesh, replicated
from dediffusion_jax.models import build as model_build
from dediffusion_jax.models.dediffusion import DeDiffusion
from dediffusion_jax.t2i.folder import LoadedDecoder
from dediffusion_jax.train import builders, checkpoint as ckpt_lib, metrics as metrics_lib
from dediffusion_jax.train import optimizer as optimizer_lib, step as step_lib

log = logging.getLogger(__name__)

DEVICE_KEYS = ("backbone", "decoder")  # batch fields the step reads; ids/captions stay on the host


@dataclasses.dataclass
class Parts:
    """Everything a run (or inference) builds from a config and a loaded decoder; no arrays yet."""

    config: ml_collections.ConfigDict
    decoder: LoadedDecoder
    model: DeDiffusion
    init_params: Callable[[jax.Array], Any]
    pretrained_backbone: Any | None
    optimizer: optax.GradientTransformation
    lr_fn: Callable[[Any], Any]
    temperature_fn: Callable[[Any], Any]

    @property
    def frozen_backbone(self) -> bool:
        return bool(self.config.backbone.frozen)

    def init_state(self, key: jax.Array, backbone: Any | None = None) -> step_lib.TrainState:
        """Trainable params (+ a pretrained, trained backbone if given) and their optimizer state."""
        params = self.init_params(key)
        if backbone is not None:
            params = {**params, "backbone": backbone}
        trainable, _ = step_lib.split_params(params, self.frozen_backbone)
        return step_lib.TrainState(jnp.zeros((), jnp.int32), trainable, self.optimizer.init(trainable))

    @property
    def state_backbone_arg(self) -> Any | None:
        return None if self.frozen_backbone else self.pretrained_backbone

    @property
    def abstract_state(self) -> step_lib.TrainState:
        return jax.eval_shape(self.init_state, jax.random.key(0), self.state_backbone_arg)

    def frozen_params(self, key: jax.Array) -> dict[str, Any]:
        """{"decoder": ..., "backbone"?: ...}: the frozen backbone is the pretrained one, or (random
        frozen-backbone ablation) the init's backbone from `key`, recomputed identically later."""
        frozen: dict[str, Any] = {"decoder": self.decoder.params}
        if self.frozen_backbone:
            if self.pretrained_backbone is not None:
                frozen["backbone"] = self.pretrained_backbone
            else:
                frozen["backbone"] = jax.jit(lambda k: self.init_params(k)["backbone"])(key)
        return frozen


def build_parts(config: ml_collections.ConfigDict, decoder: LoadedDecoder) -> Parts:
    model, init_params, pretrained = model_build.build_model(config, decoder.spec)
    return Parts(config, decoder, model, init_params, pretrained,
                 optimizer_lib.make_optimizer(config), optimizer_lib.make_lr_schedule(config),
                 builders.build_temperature_fn(config))


# ---------------------------------------------------------------------------------------------------
# Data


def make_data(config: ml_collections.ConfigDict, decoder: LoadedDecoder, *,
              process_index: int | None = None, process_count: int | None = None) -> pipeline.Dataset:
    """The per-process pipeline of config.data (a sources.py spec, or a prefix that a module of
    config.imports registered).

    process_index/process_count default to this process's; pass them to build another host's shard.
    """
    spec = str(config.data.source)
    if not spec:
        raise ValueError("config.data.source is empty; set e.g. --config.data.source=folder:/images\n"
                         + sources.spec_forms())
    extensions.import_extensions(config)
    built = sources.build_source(spec, config)
    source, preprocess_fn = built.source, built.preprocess_fn
    if preprocess_fn is None:
        p = dict(config.data.preprocess)
        p.pop("decoder_size", None)
        preprocess_fn = preprocess.Preprocessor(preprocess.PreprocessConfig.from_dict(
            {**p, "backbone_size": int(config.backbone.image_size),
             "decoder_size": _decoder_view_size(config, decoder)}))
    return pipeline.make_dataset(
        source, global_batch_size=int(config.batch_size), seed=int(config.seed),
        shuffle=bool(config.data.shuffle), worker_count=int(config.data.worker_count),
        read_threads=int(config.data.read_threads), preprocess_fn=preprocess_fn,
        process_index=process_index, process_count=process_count)


def device_fields(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(batch[k], np.float32) for k in DEVICE_KEYS if k in batch}


# ---------------------------------------------------------------------------------------------------
# Helpers


def place(tree: Any, shardings: Any) -> Any:
    """Host arrays that exist in full on every process -> global arrays (works multi-process)."""
    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


class _StopFlag:
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

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
    m = config.mesh
    return make_mesh({"data": int(m.data), "fsdp": int(m.fsdp), "tensor": int(m.tensor)})


def load_decoder_for(config: ml_collections.ConfigDict) -> LoadedDecoder:
    from dediffusion_jax.t2i.folder import load_decoder

    path = str(config.decoder.path)
    if not path:
        from dediffusion_jax.t2i.folder import DecoderFolderError

        raise DecoderFolderError("config.decoder.path is empty: give a diffusers-format decoder "
                                 "folder (--config.decoder.path=DIR)")
    return load_decoder(path)


# ---------------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       *, decoder: LoadedDecoder | None = None, dataset: Any | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns a summary dict.

    `decoder`: an already loaded decoder (tests); by default config.decoder.path is loaded.
    `dataset`: an iterable of host-local batches whose iterator has get_state/set_state and
      num_skipped (as pipeline.Dataset); by default `make_data(config, decoder)`.
    Raises CheckpointError (corrupt restore, other decoder) and DecoderFolderError (bad path).
    """
    workdir = Path(workdir).expanduser().resolve()
    multihost.initialize_distributed()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    decoder = decoder if decoder is not None else load_decoder_for(config)
    dec_info = ckpt_lib.decoder_info(decoder)
    mesh = _mesh_from_config(config)
    total = int(config.total_steps)
    global_batch = int(config.batch_size)
    if global_batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"batch_size {global_batch} is not a multiple of the data x fsdp mesh size "
                         f"{mesh.shape['data'] * mesh.shape['fsdp']}")

    parts = build_parts(config, decoder)
    seed = int(config.seed)
    init_key = jax.random.key(seed)

    # Frozen weights: placed on the mesh once, never donated, never in the optimizer.
    frozen_host = parts.frozen_params(init_key)
    frozen_rules = sharding_lib.frozen_rules(fsdp=bool(config.mesh.frozen_fsdp))
    frozen_sh = sharding_lib.tree_shardings(frozen_host, mesh, frozen_rules)
    frozen = place(frozen_host, frozen_sh)
    del frozen_host

    # Train state: restored from the latest checkpoint, or born sharded.
    abstract = parts.abstract_state
    state_sh = step_lib.state_shardings_for(abstract, mesh, sharding_lib.ENCODER_RULES)
    manager = ckpt_lib.make_manager(workdir, keep=int(config.checkpoint.keep),
                                    async_save=bool(config.checkpoint.async_save))
    dataset = make_data(config, decoder) if dataset is None else dataset
    data_iter = iter(dataset)
    latest = manager.latest_step()
    if latest is not None:
        ckpt_lib.check_decoder(manager, latest, dec_info)
        state = ckpt_lib.restore(manager, latest, ckpt_lib.abstract_with_shardings(abstract, state_sh),
                                 data_iter)
        log.info("resumed from step %d of %s", int(state.step), manager.directory)
    else:
        backbone = parts.state_backbone_arg
        backbone_sh = None
        if backbone is not None:
            backbone_sh = state_sh.params["backbone"]
            backbone = place(backbone, backbone_sh)
        state = jax.jit(parts.init_state, out_shardings=state_sh)(init_key, backbone)
        if is_main:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    start_step = int(jax.device_get(state.step))

    # The step, compiled ahead of time for the global batch shape.
    step_fn = step_lib.make_step_fn(parts.model, parts.optimizer, parts.lr_fn, parts.temperature_fn)
    size, dsize = int(config.backbone.image_size), _decoder_view_size(config, decoder)
    example = {"backbone": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
               "decoder": jax.ShapeDtypeStruct((global_batch, dsize, dsize, 3), jnp.float32)}
    rng = jax.jit(lambda: jax.random.key(seed + 1), out_shardings=replicated(mesh))()
    fns = step_lib.compile_step(step_fn, state, state_sh, frozen, frozen_sh, example, mesh, rng)
    token_ids = jax.jit(parts.model.token_ids, out_shardings=replicated(mesh))

    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=bool(config.log.tensorboard))
    if is_main and start_step == 0:
        writer.write_scalars(0, {"compile_seconds": fns.compile_seconds,
                                 "gflops_per_step_per_device": (fns.flops_per_step or 0) / 1e9})
    timer = metrics_lib.StepTimer(global_batch, jax.device_count(), fns.flops_per_step)
    progress = metrics_lib.Progress(total, int(config.log.progress_every), start_step)
    stop = _StopFlag()
    every = int(config.checkpoint.every_steps)
    samples_every = int(config.log.samples_every)
    sample_images, sample_ids = None, None
    last_saved = start_step if latest is not None else -1
    pending: tuple[int, Any, int] | None = None
    step = start_step
    last_scalars: dict[str, float] = {}

    def flush() -> None:
        nonlocal pending, last_scalars
        if pending is None:
            return
        n, m, skipped = pending
        pending = None
        scalars = metrics_lib.to_floats(jax.device_get(m))
        scalars.update(timer.lap())
        scalars["data_skipped"] = float(skipped)
        last_scalars = scalars
        if int(config.log.every_steps) and (n % int(config.log.every_steps) == 0 or n == total):
            writer.write_scalars(n, scalars)
        line = progress.maybe_log(n, scalars)
        if line and is_main:
            print(line, flush=True)

    def save(n: int) -> None:
        nonlocal last_saved
        if n == last_saved:
            return
        multihost.sync_global_devices(f"save_{n}")
        ckpt_lib.save(manager, n, state, data_iter, config, dec_info)
        last_saved = n

    log.info("training steps %d -> %d, global batch %d on %d devices (%d processes)",
             start_step, total, global_batch, jax.device_count(), jax.process_count())
    t_start = time.perf_counter()
    try:
        while step < total:
            local = next(data_iter)
            batch = multihost.host_local_batch_to_global(mesh, device_fields(local), fns.batch_sharding)
            if sample_images is None:
                k = int(config.log.num_samples)
                sample_images = jax.jit(lambda x: x[:k], out_shardings=replicated(mesh))(batch["backbone"])
                sample_ids = [str(i) for i in list(local.get("id", range(k)))[:k]]
            state, m = fns.step(state, frozen, batch, rng)
            flush()  # the previous step's metrics, fetched while this step runs
            step += 1
            pending = (step, m, data_iter.num_skipped)
            if samples_every and (step % samples_every == 0 or step == total):
                ids = np.asarray(jax.device_get(token_ids(state.params, frozen, sample_images)))
                texts = parts.model.texts(ids)
                if is_main:
                    writer.write_samples(step, sample_ids, texts)
                    for i, t in zip(sample_ids, texts):
                        log.info("sample step %d %s: %s", step, i, t)
            if every and step % every == 0:
                flush()
                save(step)
            if stop.agreed():
                flush()
                save(step)
                log.warning("stopped by signal at step %d; checkpoint saved", step)
                break
        flush()
        if step >= total:
            save(step)
        manager.wait_until_finished()
    finally:
        stop.restore()
        writer.close()
        manager.close()
    seconds = time.perf_counter() - t_start
    summary = {"start_step": start_step, "step": step, "preempted": step < total,
               "seconds": seconds, "steps_per_s": (step - start_step) / max(seconds, 1e-9),
               "compile_seconds": fns.compile_seconds, "flops_per_step": fns.flops_per_step,
               "final": last_scalars}
    if is_main:
        log.info("run summary: %s", json.dumps(summary, default=str))
    return summary


def _decoder_view_size(config: ml_collections.ConfigDict, decoder: LoadedDecoder) -> int:
    """data.preprocess.decoder_size, or (0) the decoder's own image size."""
    return int(config.data.preprocess.decoder_size) or decoder.image_size
