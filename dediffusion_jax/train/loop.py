"""The De-Diffusion training program: `train_and_evaluate(config, workdir)`, a task of the trainer spine.

What De-Diffusion supplies to the spine (train/trainer.py), which does the rest (mesh, state born
sharded or restored, the AOT-compiled donated step, checkpoints with the grain iterator, SIGTERM,
metrics/TensorBoard/progress, the config's evaluators):
  the decoder loaded ONCE, its frozen tree (+ a frozen backbone) placed on the mesh once ─► the
  encoder's TrainState (trainable params + optimizer state) ─► per-process grain shards ─► global
  batch ─► the De-Diffusion loss (train/step.py) ─► sample texts every M steps ─► checkpoints with
  the run's config and the decoder's identity (a resume refuses another decoder).

Determinism: step n uses rng fold_in(key(seed + 1), n) and the n-th batch of a seeded, checkpointed
data iterator, so a resumed run reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses
import logging
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
from dediffusion_jax.data import latents as latents_lib, pipeline, preprocess, sources
from dediffusion_jax.parallel import multihost, sharding as sharding_lib
from dediffusion_jax.parallel.mesh import batch_shard_count, make_mesh, replicated
from dediffusion_jax.models import build as model_build
from dediffusion_jax.models.dediffusion import DeDiffusion
from dediffusion_jax.t2i.folder import LoadedDecoder
from dediffusion_jax.train import builders, checkpoint as ckpt_lib
from dediffusion_jax.train import optimizer as optimizer_lib, step as step_lib, trainer as trainer_lib
from dediffusion_jax.evaluation import evaluators as evaluators_lib

log = logging.getLogger(__name__)

# Batch fields the step reads (the decoder view, or its precomputed VAE posterior from a latents:
# source); ids/captions stay on the host.
DEVICE_KEYS = ("backbone", "decoder", "latent_mean", "latent_logvar")
# Config fields a resumed run may change freely: they alter neither the optimisation nor the data
# stream (logging, how often and how many checkpoints, evaluators, the mesh layout, the decoder's
# location: its weights hash is checked separately). Anything else needs resume.allow_changes.
FREE_ON_RESUME = ("log", "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save", "evals",
                  "resume", "mesh", "decoder.path", "data.read_threads",
                  # the fused vocabulary head's chunking and the UNet's pre-flipped kernels: memory
                  # and speed, the same values
                  "quantizer.rows_per_chunk", "quantizer.chunk_budget_mb", "decoder.flip_conv_kernels")


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

    def frozen_params(self) -> dict[str, Any]:
        """{"decoder": ..., "backbone"?: ...}: the frozen backbone is the pretrained one, or (random
        frozen-backbone ablation) the init's backbone from key(config.seed), as inference rebuilds it.
        The decoder's tree gets the UNet's flipped convolution kernels when config.decoder.flip_conv_kernels
        asks for them (on CPU by default)."""
        decoder = {**self.decoder.params,
                   **model_build.frozen_unet_input_grad_kernels(self.config, self.decoder.params["unet"])}
        return {"decoder": decoder,
                **model_build.frozen_backbone(self.config, self.init_params, self.pretrained_backbone)}


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
    source, preprocess_fn = source_and_preprocess(config, decoder)
    return pipeline.make_dataset(
        source, global_batch_size=int(config.batch_size), seed=int(config.seed),
        shuffle=bool(config.data.shuffle), worker_count=int(config.data.worker_count),
        read_threads=int(config.data.read_threads), preprocess_fn=preprocess_fn,
        process_index=process_index, process_count=process_count)


def source_and_preprocess(config: ml_collections.ConfigDict, decoder: LoadedDecoder
                          ) -> tuple[sources.ImageSource, pipeline.PreprocessFn]:
    """The source of config.data.source and the function that makes its records' views (the
    source's own, or the standard backbone + decoder views): what the run trains on, one record at a
    time (`python -m dediffusion_jax.encode_latents` encodes these)."""
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
        mean, std = model_build.backbone_normalisation(config)  # what the backbone expects
        preprocess_fn = preprocess.Preprocessor(preprocess.PreprocessConfig.from_dict(
            {**p, "backbone_size": int(config.backbone.image_size), "backbone_mean": mean,
             "backbone_std": std, "decoder_size": _decoder_view_size(config, decoder)}))
    return source, preprocess_fn


def latents_source_for(config: ml_collections.ConfigDict,
                       decoder: LoadedDecoder) -> latents_lib.LatentsSource | None:
    """The latents folder of a `latents:DIR` data source, checked against this run (finished, this
    decoder's weights identity, this backbone's view size and normalisation); None for other sources.
    Raises LatentsError (one line)."""
    spec = str(config.data.source)
    if not latents_lib.is_latents_spec(spec):
        return None
    if not decoder.is_latent:
        raise latents_lib.LatentsError(f"data.source={spec!r} holds VAE latents, but the decoder "
                                       f"{decoder.path} is pixel-space (no vae/)")
    folder = latents_lib.LatentsSource(latents_lib.directory_of(spec))
    mean, std = model_build.backbone_normalisation(config)
    folder.check_run(decoder_identity=decoder.identity, decoder_path=decoder.path,
                     backbone_size=int(config.backbone.image_size), backbone_mean=mean,
                     backbone_std=std)
    return folder


def device_fields(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(batch[k], np.float32) for k in DEVICE_KEYS if k in batch}


# ---------------------------------------------------------------------------------------------------
# Helpers


place = trainer_lib.place  # kept for callers of loop.place


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
                       *, decoder: LoadedDecoder | None = None, dataset: Any | None = None,
                       stop_after_steps: int = 0, stop_after_minutes: float = 0.0) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` on the trainer spine; returns its summary dict
    (summary["preempted"]: it saved and stopped before config.total_steps).

    `decoder`: an already loaded decoder (tests); by default config.decoder.path is loaded.
    `dataset`: an iterable of host-local batches whose iterator has get_state/set_state and
      num_skipped (as pipeline.Dataset); by default `make_data(config, decoder)`.
    `stop_after_steps` / `stop_after_minutes`: this call saves and returns after that much training
      (0: no limit), e.g. for a runner that shares a time budget between runs; the same call resumes.
    Raises CheckpointError (corrupt restore, other decoder) and DecoderFolderError (bad path).
    """
    workdir = Path(workdir).expanduser().resolve()
    config = model_build.with_backbone_normalisation(config)  # recorded with the checkpoints
    multihost.initialize_distributed()
    decoder = decoder if decoder is not None else load_decoder_for(config)
    mesh = _mesh_from_config(config)
    dataset = make_data(config, decoder) if dataset is None else dataset
    task = de_diffusion_task(config, decoder, iter(dataset), mesh, workdir)
    settings = trainer_lib.Settings(
        total_steps=int(config.total_steps), log_every=int(config.log.every_steps),
        progress_every=int(config.log.progress_every), checkpoint_every=int(config.checkpoint.every_steps),
        keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save),
        tensorboard=bool(config.log.tensorboard),
        allow_changes=allowed_changes(config), stop_after_steps=int(stop_after_steps),
        stop_after_minutes=float(stop_after_minutes))
    return trainer_lib.Trainer(task, workdir, settings, mesh).run()


def allowed_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.resume.allow_changes as a tuple of keys."""
    text = str(config.get("resume", {}).get("allow_changes", ""))
    return tuple(k.strip() for k in text.split(",") if k.strip())


class EncoderView:
    """What evaluators see of the encoder being trained: `.token_ids(images)` and `.texts(images)`
    with the current params (images [B, H, W, 3] in [-1, 1] at the backbone's size), the run's `.step`
    and `.workdir` (where an evaluator may write), and the frozen `.decoder` (a LoadedDecoder)."""

    def __init__(self, model: DeDiffusion, token_ids_fn: Callable[..., Any], params: Any, frozen: Any,
                 *, step: int = 0, workdir: Path | None = None, decoder: LoadedDecoder | None = None):
        self.model, self._token_ids, self.params, self.frozen = model, token_ids_fn, params, frozen
        self.step, self.workdir, self.decoder = int(step), workdir, decoder

    def token_ids(self, images: Any) -> np.ndarray:
        return np.asarray(jax.device_get(self._token_ids(self.params, self.frozen, jnp.asarray(images))))

    def texts(self, images: Any) -> list[str]:
        return self.model.texts(self.token_ids(images))


def de_diffusion_task(config: ml_collections.ConfigDict, decoder: LoadedDecoder, data_iter: Any,
                      mesh: Mesh, workdir: Path) -> trainer_lib.Task:
    """De-Diffusion as a task of the spine: its state, loss, data, samples and checkpoint items."""
    parts = build_parts(config, decoder)
    seed = int(config.seed)
    dec_info = ckpt_lib.decoder_info(decoder)
    global_batch = int(config.batch_size)
    size, dsize = int(config.backbone.image_size), _decoder_view_size(config, decoder)
    example = {"backbone": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),
               "decoder": jax.ShapeDtypeStruct((global_batch, dsize, dsize, 3), jnp.float32)}
    frozen = parts.frozen_params()
    latents_folder = latents_source_for(config, decoder)
    if latents_folder is not None:
        # The batch brings the VAE posterior instead of the decoder view: the step samples and scales
        # it, and the VAE's weights stay off the devices (not an argument of the compiled step).
        example = {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
                   for name, (shape, dtype) in latents_folder.example_fields(global_batch).items()}
        frozen["decoder"] = {k: v for k, v in frozen["decoder"].items() if k != "vae"}
    frozen_rules = sharding_lib.frozen_rules(fsdp=bool(config.mesh.frozen_fsdp))
    token_ids = jax.jit(parts.model.token_ids, out_shardings=replicated(mesh))
    samples_every = int(config.log.samples_every)
    num_samples = int(config.log.num_samples)
    sampled: dict[str, Any] = {}
    is_main = jax.process_index() == 0

    def after_step(step: int, state: Any, frozen: Any, local: dict, batch: dict, writer: Any) -> None:
        if "images" not in sampled:  # the first batch of this invocation, replicated
            sampled["images"] = jax.jit(lambda x: x[:num_samples],
                                        out_shardings=replicated(mesh))(batch["backbone"])
            sampled["ids"] = [str(i) for i in list(local.get("id", range(num_samples)))[:num_samples]]
        if samples_every and (step % samples_every == 0 or step == int(config.total_steps)):
            ids = np.asarray(jax.device_get(token_ids(state.params, frozen, sampled["images"])))
            texts = parts.model.texts(ids)
            if is_main:
                writer.write_samples(step, sampled["ids"], texts)
                for i, t in zip(sampled["ids"], texts):
                    log.info("sample step %d %s: %s", step, i, t)

    def check(read_json: Callable[[str], dict], step: int) -> None:
        ckpt_lib.check_decoder_item(read_json("decoder"), dec_info, step, ckpt_lib.checkpoint_dir(workdir))

    def on_fresh_start() -> None:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    return trainer_lib.Task(
        init=parts.init_state,
        # The fused vocabulary head chunks each device's rows apart (models/quantizer.py).
        step_fn=step_lib.make_step_fn(
            dataclasses.replace(parts.model, batch_shards=batch_shard_count(mesh)), parts.optimizer,
            parts.lr_fn, parts.temperature_fn),
        data=data_iter,
        example_batch=example,
        seed=seed,
        rng_seed=seed + 1,
        state_shardings=lambda abstract, m: step_lib.state_shardings_for(abstract, m, sharding_lib.ENCODER_RULES),
        # Frozen weights: placed on the mesh once, never donated, never in the optimizer.
        frozen=frozen,
        frozen_shardings=lambda tree, m: sharding_lib.tree_shardings(tree, m, frozen_rules),
        # A pretrained, trained backbone starts the state (sharded like the state's backbone).
        init_inputs=parts.state_backbone_arg,
        init_input_shardings=lambda state_sh: state_sh.params["backbone"],
        to_device=device_fields,
        view=lambda state, frozen: EncoderView(parts.model, token_ids, state.params, frozen,
                                               step=int(jax.device_get(state.step)), workdir=workdir,
                                               decoder=decoder),
        evaluators=evaluators_lib.build_evaluators(config),
        checkpoint_json=lambda: ckpt_lib.de_diffusion_items(config, dec_info),
        check_checkpoint=check,
        after_step=after_step,
        on_fresh_start=on_fresh_start,
        config_item="config",
        free_keys=FREE_ON_RESUME,
    )


def _decoder_view_size(config: ml_collections.ConfigDict, decoder: LoadedDecoder) -> int:
    """data.preprocess.decoder_size, or (0) the decoder's own image size."""
    return int(config.data.preprocess.decoder_size) or decoder.image_size
