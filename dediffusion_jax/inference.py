"""Images -> De-Diffusion text with a trained encoder: one object, `TextEncoder`.

    enc = TextEncoder.from_checkpoint("runs/dd")          # a workdir (latest step) or .../checkpoints/STEP
    enc = TextEncoder.from_pretrained("exported/")        # a folder written by `enc.export(...)`
    ids = enc.token_ids(views)                            # [B, N] int32: argmax tokens, no noise
    texts = enc.texts(views)                              # the decoder's tokenizer detokenizes them

`views` are backbone views [B, S, S, 3] float32 as training made them (`enc.preprocess` says how;
`enc.view(image_bytes)` makes one). `decoder=` overrides the decoder folder recorded with the encoder
(a path or a loaded decoder); its weights must hash to the recorded identity, since an encoder only
means something with the decoder it was trained against.

An exported folder is self-contained and shareable like a diffusers folder:
    config.json        {"format", "version", "config": the run config, "backbone": the ViT shape,
                        "decoder": {"path", "identity", "tokenizer"}, "source"}
    model.safetensors  the encoder's params, the frozen backbone's included ("/"-joined keys)
    tokenizer/         the decoder's tokenizer files (what the ids mean, readable without the decoder)

Importing this module does not import optax, grain or the training loop: a checkpoint's state, config
and decoder items are read with orbax directly (the data iterator item is left alone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dediffusion_jax import weights
from dediffusion_jax.data.preprocess import PreprocessConfig, decode_image, two_views
from dediffusion_jax.train.checkpoint import (CheckpointError, DecoderMismatchError,
                                              resolve_checkpoint_path)

EXPORT_FORMAT = "dediffusion-text-encoder"
EXPORT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"

__all__ = ["CheckpointError", "DecoderMismatchError", "TextEncoder", "is_exported",
           "preprocess_config_for"]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def preprocess_config_for(config: Any) -> PreprocessConfig:
    """The backbone view of a training config: `backbone.image_size`, centre square, no augment.

    The normalisation is the backbone's, as the run trained with it (models/build.
    backbone_normalisation: the recorded backbone.mean/std, an older run's data.preprocess values,
    the backbone folder's, else CLIP's). The decoder view is not needed here, so it is made as
    small as the backbone view (it is computed and dropped).
    """
    from dediffusion_jax.models import build

    size = int(config.backbone.image_size)
    mean, std = build.backbone_normalisation(config)
    return PreprocessConfig(backbone_size=size, backbone_mean=mean, backbone_std=std,
                            decoder_size=size, augment=False)


def is_exported(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `TextEncoder.export` (not a training workdir)."""
    p = Path(path).expanduser()
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def _resolve_decoder(decoder: Any, recorded: dict[str, Any], where: str) -> Any:
    """The decoder to run with: `decoder` (a path or a LoadedDecoder) or the recorded path, checked
    against the recorded weights hash."""
    from dediffusion_jax.t2i.folder import LoadedDecoder, load_decoder

    if decoder is None:
        path = str(recorded.get("path") or "")
        if not path:
            raise CheckpointError(f"{where} records no decoder folder; pass decoder=PATH")
        decoder = path
    if not isinstance(decoder, LoadedDecoder):
        decoder = load_decoder(decoder)
    want = recorded.get("identity")
    if want and decoder.identity != want:
        raise DecoderMismatchError(
            f"{where} was trained against the decoder {recorded.get('path')!r} (weights hash {want}), "
            f"but the decoder given, {str(decoder.path or '<in memory>')!r}, hashes to "
            f"{decoder.identity}: an encoder only makes sense with its own decoder")
    return decoder


class TextEncoder:
    """A trained De-Diffusion encoder with its decoder: images -> token ids -> texts.

    `token_ids` is jitted once: every call is padded to `batch_size` (a multiple of the mesh's
    'data' axis when a mesh is given, over which batches are then sharded).
    """

    def __init__(self, config: Any, model: Any, trainable: Any, frozen: Any, decoder: Any, *,
                 batch_size: int = 32, mesh: Any = None, key: str = "") -> None:
        """`model`: a `models.dediffusion.DeDiffusion`; `trainable`/`frozen`: its param trees (only
        frozen["backbone"] is read); `decoder`: the LoadedDecoder whose spec the model holds."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        self.config = config
        self.model = model
        self.decoder = decoder
        self.key = key or f"dediffusion:{id(self)}"
        data = 1 if mesh is None else int(mesh.shape.get("data", 1))
        self.batch_size = max(data, -(-int(batch_size) // data) * data)
        self._sharding = None if mesh is None else NamedSharding(mesh, P("data"))
        frozen = {k: v for k, v in dict(frozen).items() if k == "backbone"}  # not the decoder's
        if mesh is not None:
            trainable, frozen = jax.device_put((trainable, frozen), NamedSharding(mesh, P()))
        self.trainable, self.frozen = trainable, frozen
        self._token_ids = jax.jit(model.token_ids)

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, decoder: Any = None, **kw: Any) -> TextEncoder:
        """`from_pretrained` for an exported folder, else `from_checkpoint`."""
        if is_exported(path):
            return cls.from_pretrained(path, decoder, **kw)
        return cls.from_checkpoint(path, decoder, **kw)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, decoder: Any = None, *,
                        batch_size: int = 32, mesh: Any = None) -> TextEncoder:
        """A training run's encoder: `path` is WORKDIR (its latest step) or WORKDIR/checkpoints/STEP.

        Raises CheckpointError (one line) for a missing, mistyped or corrupt checkpoint, and
        DecoderMismatchError for a decoder whose weights are not the recorded ones.
        """
        import jax
        import ml_collections
        import orbax.checkpoint as ocp

        from dediffusion_jax.models import build

        workdir, step = resolve_checkpoint_path(path)
        where = f"checkpoint step {step} of {workdir}"
        step_dir = workdir / "checkpoints" / str(step)
        manager = ocp.CheckpointManager(
            workdir / "checkpoints", item_names=("state", "config", "decoder"),
            options=ocp.CheckpointManagerOptions(create=False, read_only=True))
        try:
            def restore(**args: Any) -> Any:
                return manager.restore(step, args=ocp.args.Composite(**args))

            try:
                meta = restore(config=ocp.args.JsonRestore(), decoder=ocp.args.JsonRestore())
                config = ml_collections.ConfigDict(dict(meta["config"]))
                recorded = dict(meta["decoder"])
            except Exception as e:  # noqa: BLE001 - one line naming the checkpoint
                raise CheckpointError(f"cannot read the config of {where}: {_one_line(e)}") from e
            decoder = _resolve_decoder(decoder, recorded, where)
            try:
                model, init_params, pretrained = build.build_model(config, decoder.spec)
            except (ValueError, KeyError, AttributeError, TypeError) as e:
                raise CheckpointError(f"cannot build the model of {where}: {_one_line(e)}") from e
            abstract = jax.eval_shape(init_params, jax.random.key(0))
            if bool(config.backbone.frozen):
                abstract = {k: v for k, v in abstract.items() if k != "backbone"}
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target = {"params": jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)}
            try:
                state = restore(state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))["state"]
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot restore the encoder params of {where} "
                                      f"({step_dir / 'state'}): {_one_line(e)}") from e
        finally:
            manager.close()
        frozen = build.frozen_backbone(config, init_params, pretrained)
        return cls(config, model, state["params"], frozen, decoder, batch_size=batch_size,
                   mesh=mesh, key=f"dediffusion:{workdir}:step={step}")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, decoder: Any = None, *,
                        batch_size: int = 32, mesh: Any = None) -> TextEncoder:
        """An encoder exported by `export`, without its training workdir. `decoder` defaults to the
        recorded folder; either way its weights must hash to the recorded identity."""
        import jax
        import ml_collections
        from flax import traverse_util

        from dediffusion_jax.models import build, vit

        root = Path(folder).expanduser().resolve()
        if not is_exported(root):
            raise CheckpointError(f"{root} is not an exported text encoder (needs {CONFIG_NAME} and "
                                  f"{WEIGHTS_NAME}; TextEncoder.export writes them)")
        try:
            meta = json.loads((root / CONFIG_NAME).read_text())
            if meta.get("format") != EXPORT_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, not {EXPORT_FORMAT!r}")
            config = ml_collections.ConfigDict(meta["config"])
            vit_config = vit.ViTConfig(**meta["backbone"])
            recorded = dict(meta["decoder"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read {root / CONFIG_NAME}: {_one_line(e)}") from e
        decoder = _resolve_decoder(decoder, recorded, str(root))
        model, init_params, _ = build.build_model(config, decoder.spec, vit_config=vit_config)
        want = traverse_util.flatten_dict(jax.eval_shape(init_params, jax.random.key(0)), sep="/")
        tensors = _read_tensors(root / WEIGHTS_NAME, {k: tuple(v.shape) for k, v in want.items()})
        params = traverse_util.unflatten_dict(
            {k: np.asarray(v, want[k].dtype) for k, v in tensors.items()}, sep="/")
        trainable = dict(params)
        frozen = {"backbone": trainable.pop("backbone")} if bool(config.backbone.frozen) else {}
        digest = hashlib.sha256((root / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]
        return cls(config, model, trainable, frozen, decoder, batch_size=batch_size, mesh=mesh,
                   key=f"dediffusion:{root}:weights={digest}")

    # -- use -----------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.model.num_tokens)

    @property
    def preprocess(self) -> PreprocessConfig:
        """How an image becomes the backbone view `token_ids` takes."""
        return preprocess_config_for(self.config)

    def view(self, image: bytes) -> np.ndarray:
        """Encoded image bytes -> the backbone view [S, S, 3]; CorruptExampleError if unusable."""
        pre = self.preprocess
        im = decode_image(image, max_pixels=pre.max_pixels, min_side=pre.min_decode_side())
        return two_views(im, pre)[0]

    def token_ids(self, images: np.ndarray) -> np.ndarray:
        """Backbone views [B, S, S, 3] -> the argmax tokens [B, N] (int32 numpy)."""
        import jax

        images = np.asarray(images, np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate(
                    [chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            x = chunk if self._sharding is None else jax.device_put(chunk, self._sharding)
            out.append(np.asarray(self._token_ids(self.trainable, self.frozen, x))[:n])
        if not out:
            return np.zeros((0, self.num_tokens), np.int32)
        return np.concatenate(out).astype(np.int32)

    def texts_of_ids(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Token ids [B, N] -> the texts the decoder reads (its tokenizer detokenizes them)."""
        return self.model.texts(np.asarray(ids))

    def texts(self, images: np.ndarray) -> list[str]:
        """Backbone views [B, S, S, 3] -> De-Diffusion texts."""
        return self.texts_of_ids(self.token_ids(images))

    # -- export --------------------------------------------------------------------------------------
    def export(self, folder: str | os.PathLike) -> Path:
        """Writes the self-contained folder `from_pretrained` loads (see the module docstring)."""
        import jax
        from flax import traverse_util

        from dediffusion_jax.t2i.folder import save_tokenizer

        root = Path(folder).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        params = jax.device_get(self.model.merge(self.trainable, self.frozen))
        flat = {k: np.ascontiguousarray(v) for k, v in
                traverse_util.flatten_dict(params, sep="/").items()}
        weights.save(flat, root / WEIGHTS_NAME, metadata={"format": EXPORT_FORMAT})
        save_tokenizer(self.decoder.tokenizer, root / TOKENIZER_DIR)
        meta = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "config": json.loads(self.config.to_json()),
            "backbone": dataclasses.asdict(self.model.encoder.backbone.config),
            "decoder": {"path": str(self.decoder.path or ""), "identity": self.decoder.identity,
                        "tokenizer": TOKENIZER_DIR},
            "source": self.key,
        }
        tmp = root / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.replace(root / CONFIG_NAME)
        return root


def _read_tensors(path: Path, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The export's weights, checked against the shapes its config builds (weights.py does both)."""
    try:
        tensors = weights.read_file(path)
        weights.check_shapes(tensors, expected, path)
    except weights.WeightsError as e:
        raise CheckpointError(_one_line(e)) from e
    return tensors
