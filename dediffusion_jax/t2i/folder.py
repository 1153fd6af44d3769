"""Diffusers-format checkpoint folders <-> the project's Flax decoder.

Why: researchers hold Stable Diffusion-class models as diffusers folders (model_index.json, one
subfolder per component with config.json + *.safetensors). This module reads such a folder into Flax
params with the explicit name/transposition rules of `convert.py`, checked against each module's
abstract shapes, and writes params back in the same format so that diffusers' PyTorch classes load
them. Only safetensors are read: pickle-based weights (.bin/.ckpt/.pt) are refused, because loading a
pickle runs arbitrary code.

Layout read (and written):
    model_index.json
    text_encoder/{config.json, model.safetensors}
    tokenizer/{vocab.json, merges.txt, ...}
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}      (absent for pixel-space decoders)
    scheduler/scheduler_config.json
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax import weights
from dediffusion_jax.t2i import clip_text, convert, schedules, unet, vae
from dediffusion_jax.errors import UserError

REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "scheduler")


class DecoderFolderError(UserError, ValueError):
    """A decoder folder is missing, incomplete, or holds something we refuse to load."""


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of jit
class DecoderSpec:
    """The static part of a frozen text-to-image decoder: configs, tokenizer, noise schedule, dtype.

    Holds no arrays, so it is safe (and cheap) as a static argument of jitted functions; the
    weights travel separately as a params pytree {"text_encoder", "unet", "vae"?} (`LoadedDecoder`
    pairs the two). Hashed by object identity: reuse one spec to reuse compiled programs.
    """

    path: Path | None
    text_config: clip_text.CLIPTextConfig
    unet_config: unet.UNetConfig
    vae_config: vae.VAEConfig | None
    schedule: schedules.NoiseSchedule
    tokenizer: Any  # transformers.CLIPTokenizer(Fast)
    dtype: Any = jnp.float32  # compute dtype of the modules (params stay float32)
    remat: bool = False  # rematerialise the text encoder's layers and the UNet's blocks (training)

    @property
    def text_encoder(self) -> clip_text.CLIPTextModel:
        return clip_text.CLIPTextModel(config=self.text_config, dtype=self.dtype, remat=self.remat)

    @property
    def unet(self) -> unet.UNet2DConditionModel:
        return unet.UNet2DConditionModel(config=self.unet_config, dtype=self.dtype, remat=self.remat)

    @property
    def vae(self) -> vae.AutoencoderKL | None:
        if self.vae_config is None:
            return None
        return vae.AutoencoderKL(config=self.vae_config, dtype=self.dtype)

    @property
    def is_latent(self) -> bool:
        return self.vae_config is not None

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae_config is None:
            return 1
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the images the decoder draws (latent size x VAE scale for latent decoders)."""
        return int(self.unet_config.sample_size) * self.vae_scale_factor

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape (H, W, C) of the diffusion variable x_t (pixels or VAE latents), NHWC."""
        s = int(self.unet_config.sample_size)
        return (s, s, int(self.unet_config.in_channels))


def weights_identity(params: dict[str, Any]) -> str:
    """A hash of decoder weights: checkpoints record it so a resumed run refuses another decoder."""
    digest = hashlib.sha256()
    for name in sorted(params):
        for key, value in sorted(convert.flax_to_torch(params[name]).items()):
            digest.update(f"{name}/{key}".encode())
            digest.update(np.ascontiguousarray(value, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedDecoder:
    """A decoder as loaded from a folder: its static `spec` and its `params` pytree.

    Unpacks as `spec, params = load_decoder(path)`. Attributes of the spec (tokenizer, unet,
    image_size, ...) read through, so code that only needs the spec may take either; jitted code
    takes `spec` as a static argument and `params` as an ordinary one.
    """

    spec: DecoderSpec
    params: dict[str, Any]  # {"text_encoder": ..., "unet": ..., "vae"?: ...}

    def __iter__(self):
        return iter((self.spec, self.params))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("spec", "params"):  # (copy/pickle probes, unpickling)
            raise AttributeError(name)
        return getattr(self.spec, name)

    @functools.cached_property
    def identity(self) -> str:
        """`weights_identity(params)`, computed once (it hashes every weight)."""
        return weights_identity(self.params)


# ----------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DecoderFolderError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DecoderFolderError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DecoderFolderError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


# The class that re-saves a component's pickle weights as safetensors (shown in the refusal).
_CONVERTERS = {"text_encoder": "transformers.CLIPTextModel", "unet": "diffusers.UNet2DConditionModel",
               "vae": "diffusers.AutoencoderKL"}


def _read_weights(component_dir: Path) -> dict[str, np.ndarray]:
    """The component's tensors (one file, or the shards an index names), read by `weights.read`."""
    cls = _CONVERTERS.get(component_dir.name, "diffusers.UNet2DConditionModel")
    try:
        return weights.read(component_dir, convert=weights.save_pretrained_command(component_dir, cls))
    except weights.WeightsError as e:
        raise DecoderFolderError(str(e)) from e


def abstract_params(module: Any, inputs: tuple) -> Any:
    """Param shapes of `module` without allocating them."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    return shapes["params"]


def _load_component(
    component_dir: Path, module: Any, inputs: tuple, prepare: Any = None, **kw: Any
) -> Any:
    state = _read_weights(component_dir)
    if prepare is not None:
        state = prepare(state)
    params = convert.torch_to_flax(
        state, abstract_params(module, inputs), source=str(component_dir), **kw
    )
    # Half-precision checkpoints (SD "fp16" variants, our float16 world decoder) are upcast: params
    # always live in float32, the compute dtype is the spec's `dtype`.
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def _config_from(cls: Any, path: Path) -> Any:
    try:
        return cls.from_dict(_read_json(path))
    except DecoderFolderError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise DecoderFolderError(f"{path}: {e}") from e


def load_tokenizer(tokenizer_dir: Path, context_length: int | None = None) -> Any:
    """A CLIP tokenizer from local files (vocab.json + merges.txt, or tokenizer.json); no network."""
    from transformers import CLIPTokenizer

    has_bpe = all((tokenizer_dir / n).is_file() for n in ("vocab.json", "merges.txt"))
    if not has_bpe and not (tokenizer_dir / "tokenizer.json").is_file():
        raise DecoderFolderError(
            f"missing file: {tokenizer_dir / 'vocab.json'} (a CLIP tokenizer needs vocab.json + "
            "merges.txt, or tokenizer.json)"
        )
    kwargs = {"local_files_only": True}
    if context_length is not None:
        kwargs["model_max_length"] = context_length
    try:
        return CLIPTokenizer.from_pretrained(str(tokenizer_dir), **kwargs)
    except Exception as e:
        raise DecoderFolderError(f"cannot load the tokenizer in {tokenizer_dir}: {e}") from e


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Writes tokenizer files that both transformers 4.x (vocab.json + merges.txt) and 5.x read.

    transformers 5 saves only tokenizer.json, which older diffusers stacks cannot read, so the BPE
    files the tokenizer was loaded from are copied beside it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    for name in ("vocab.json", "merges.txt"):
        if (source / name).is_file() and source.resolve() != directory.resolve():
            shutil.copyfile(source / name, directory / name)


def load_decoder(path: str | Path, *, dtype: Any = jnp.float32,
                 load_vae: bool = True) -> LoadedDecoder:
    """Loads a diffusers-format text-to-image folder into Flax: `spec, params = load_decoder(path)`.

    Args:
      path: the folder (e.g. a downloaded stable-diffusion-2-base, or the miniature world's decoder).
      dtype: compute dtype of the modules (params stay float32).
      load_vae: skip the VAE's weights when only the text encoder and UNet are needed.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DecoderFolderError(f"decoder folder does not exist: {root}")
    if not root.is_dir():
        raise DecoderFolderError(f"decoder path is not a folder: {root}")
    for component in REQUIRED_COMPONENTS:
        if not (root / component).is_dir():
            raise DecoderFolderError(
                f"{root} is not a complete diffusers folder: subfolder '{component}/' is missing "
                f"(expected {', '.join(REQUIRED_COMPONENTS)} and, for latent decoders, vae)"
            )

    text_config = _config_from(clip_text.CLIPTextConfig, root / "text_encoder" / "config.json")
    unet_config = _config_from(unet.UNetConfig, root / "unet" / "config.json")
    vae_config = None
    if (root / "vae").is_dir():
        vae_config = _config_from(vae.VAEConfig, root / "vae" / "config.json")
    elif unet_config.in_channels != 3:
        raise DecoderFolderError(
            f"{root}: unet in_channels={unet_config.in_channels} needs a latent VAE, but 'vae/' is "
            "missing (only 3-channel pixel-space UNets run without one)"
        )
    schedule = _config_from(schedules.NoiseSchedule, root / "scheduler" / "scheduler_config.json")
    tokenizer = load_tokenizer(root / "tokenizer", text_config.max_position_embeddings)

    params: dict[str, Any] = {
        "text_encoder": _load_component(
            root / "text_encoder",
            clip_text.CLIPTextModel(config=text_config),
            clip_text.dummy_inputs(text_config),
            ignore=clip_text.TORCH_IGNORE,
            aliases=clip_text.TORCH_ALIASES,
        ),
        "unet": _load_component(
            root / "unet",
            unet.UNet2DConditionModel(config=unet_config),
            unet.dummy_inputs(unet_config),
            ignore=unet.TORCH_IGNORE,
        ),
    }
    if vae_config is not None and load_vae:
        params["vae"] = _load_component(
            root / "vae",
            vae.AutoencoderKL(config=vae_config),
            vae.dummy_inputs(vae_config),
            prepare=vae.squeeze_legacy_attention,
            ignore=vae.TORCH_IGNORE,
            aliases=vae.TORCH_ALIASES,
        )
    spec = DecoderSpec(root, text_config, unet_config, vae_config, schedule, tokenizer, dtype)
    return LoadedDecoder(spec, params)


# ----------------------------------------------------------------------------------------------
# Writing


def _write_component(directory: Path, config: dict, params: Any, weights_name: str,
                     dtype: Any = np.float32) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # A shard index left by an earlier sharded checkpoint would take precedence over the single
    # file written here (for our reader and for diffusers/transformers): remove it and its shards.
    for index in directory.glob("*.safetensors.index.json"):
        for shard in directory.glob("*-of-*.safetensors"):
            shard.unlink()
        index.unlink()
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: np.asarray(v, dtype=dtype) for k, v in convert.flax_to_torch(params).items()}
    weights.save(tensors, directory / weights_name)


def save_decoder(decoder: LoadedDecoder, path: str | Path, *,
                 weights_dtype: Any = np.float32) -> Path:
    """Writes `decoder` (spec + params) as a diffusers-format folder that diffusers/transformers
    (PyTorch) load.

    `weights_dtype=np.float16` halves the files (loading upcasts to float32 again).
    """
    if np.dtype(weights_dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"weights_dtype must be float32 or float16, got {weights_dtype}")
    import diffusers

    root = Path(path).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    latent = decoder.vae_config is not None
    index = {
        "_class_name": "StableDiffusionPipeline" if latent else "DeDiffusionPixelDecoder",
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if latent:
        index.update(
            vae=["diffusers", "AutoencoderKL"],
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_component(
        root / "text_encoder",
        decoder.text_config.to_dict(),
        decoder.params["text_encoder"],
        "model.safetensors",
        weights_dtype,
    )
    _write_component(
        root / "unet",
        decoder.unet_config.to_dict(),
        decoder.params["unet"],
        "diffusion_pytorch_model.safetensors",
        weights_dtype,
    )
    if latent:
        if "vae" not in decoder.params:
            raise DecoderFolderError("cannot save a latent decoder loaded with load_vae=False")
        _write_component(
            root / "vae",
            decoder.vae_config.to_dict(),
            decoder.params["vae"],
            "diffusion_pytorch_model.safetensors",
            weights_dtype,
        )
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(decoder.schedule.to_dict(), indent=2) + "\n"
    )
    save_tokenizer(decoder.tokenizer, root / "tokenizer")
    return root
