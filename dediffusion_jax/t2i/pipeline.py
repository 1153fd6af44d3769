"""Text -> images with a frozen decoder: tokenize, encode, DDIM with classifier-free guidance, decode.

Why one jitted function per (batch shape, steps, guidance): the whole sampling loop, the text encoder
and the VAE decode compile into one XLA program, so a batch costs one dispatch, and the batch can be
sharded over a device mesh by the shardings of its inputs. The decoder's `DecoderSpec` is the static
argument and its params an ordinary (traced) one, so new weights reuse the compiled program. Noise is
drawn per example from (seed, global example index), so images do not depend on batch size or mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dediffusion_jax.t2i import schedules
from dediffusion_jax.t2i.folder import DecoderSpec, LoadedDecoder


def tokenize(decoder: DecoderSpec | LoadedDecoder, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> int32 ids [B, L], padded and truncated as the decoder's tokenizer does."""
    out = decoder.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=decoder.context_length,
        truncation=True,
        return_tensors="np",
    )
    return np.asarray(out["input_ids"], dtype=np.int32)


def text_states(decoder: DecoderSpec, params: Any, input_ids: jax.Array) -> jax.Array:
    """The text encoder's last hidden states [B, L, D]: what the UNet cross-attends to."""
    out = decoder.text_encoder.apply({"params": params["text_encoder"]}, input_ids=input_ids)
    return out.last_hidden_state


def initial_noise(decoder: DecoderSpec | LoadedDecoder, seed: int, indices: np.ndarray) -> jax.Array:
    """x_T for the given global example indices; independent of batching and device layout."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, decoder.sample_shape, jnp.float32))(keys)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] float NHWC -> uint8 NHWC."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def sample_from_states(
    decoder: DecoderSpec,
    params: Any,
    cond_states: jax.Array,
    uncond_states: jax.Array | None,
    x_T: jax.Array,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """DDIM from x_T conditioned on text states; returns images in [-1, 1] NHWC.

    With `uncond_states` and guidance_scale != 1, the conditional and unconditional predictions
    come from one batched UNet call and are combined as uncond + w * (cond - uncond), as Stable
    Diffusion does. Differentiable and jittable; `generate` is the convenient entry point.

    With eta != 0, `rng` is one key (the variance noise of the whole batch, as
    `schedules.ddim_sample` draws it) or a batch of keys [B], one per example (step i's noise
    of example b is `normal(fold_in(rng[b], i))`, so it does not depend on the batch's makeup).
    """
    unet = decoder.unet
    variables = {"params": params["unet"]}

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return unet.apply(variables, x, t, cond_states)

    if uncond_states is not None and guidance_scale != 1.0:
        both_states = jnp.concatenate([uncond_states, cond_states])  # diffusers' order
        model_fn = schedules.guided_model_fn(
            lambda x2, t2: unet.apply(variables, x2, t2, both_states), guidance_scale
        )

    if _is_key_batch(rng) and not (isinstance(eta, (int, float)) and eta == 0):
        x0 = _ddim_per_example_noise(model_fn, x_T, decoder.schedule, num_steps, eta, rng)
    else:
        x0 = schedules.ddim_sample(model_fn, x_T, decoder.schedule, num_steps, eta=eta, rng=rng)
    if decoder.is_latent:
        from dediffusion_jax.t2i import vae as vae_lib

        return vae_lib.images_from_latents(params["vae"], decoder.vae_config, x0)
    return x0


def _is_key_batch(rng: jax.Array | None) -> bool:
    """[B] typed keys, or [B, 2] raw uint32 keys (a single legacy PRNGKey is [2])."""
    if rng is None:
        return False
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return rng.ndim == (1 if typed else 2)


def _ddim_per_example_noise(
    model_fn: Any,
    x_T: jax.Array,
    schedule: schedules.NoiseSchedule,
    num_steps: int,
    eta: float | jax.Array,
    keys: jax.Array,
) -> jax.Array:
    """`schedules.ddim_sample` with the variance noise drawn per example from `keys` [B]."""
    ts = jnp.asarray(schedules.ddim_timesteps(schedule, num_steps), jnp.int32)
    prev = jnp.asarray(schedules.ddim_prev_timesteps(schedule, num_steps), jnp.int32)
    batch = x_T.shape[0]

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = jnp.full((batch,), ts[i], jnp.int32)
        out = model_fn(x, t)
        noise = jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype)
        )(keys)
        x, _ = schedules.ddim_step(
            schedule, out, t, jnp.full((batch,), prev[i], jnp.int32), x, eta, noise
        )
        return x

    return jax.lax.fori_loop(0, num_steps, body, x_T)


def variance_keys(seed: int, indices: np.ndarray) -> jax.Array:
    """Per-example keys of the DDIM variance noise (eta > 0), disjoint from `initial_noise`'s."""
    base = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0x5EED))[1]
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


@functools.partial(jax.jit, static_argnames=("decoder", "num_steps", "guidance_scale", "eta"))
def _sample_ids(
    decoder: DecoderSpec,
    params: Any,
    ids: jax.Array,
    uncond_ids: jax.Array | None,
    x_T: jax.Array,
    rng: jax.Array,
    num_steps: int,
    guidance_scale: float,
    eta: float,
) -> jax.Array:
    cond = text_states(decoder, params, ids)
    uncond = None if uncond_ids is None else text_states(decoder, params, uncond_ids)
    return sample_from_states(
        decoder, params, cond, uncond, x_T,
        num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, rng=rng,
    )


def generate(
    decoder: LoadedDecoder,
    prompts: Sequence[str],
    *,
    num_steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 16,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Prompts -> uint8 images [B, H, W, 3] drawn by `decoder` (spec + params, as `load_decoder`
    returns it; `LoadedDecoder(spec, params)` for other weights); deterministic for a seed.

    With a mesh, each batch is split over its 'data' axis (batch_size is rounded up to a multiple of
    that axis; a short last batch is padded and the padding dropped).
    """
    prompts = list(prompts)
    if not prompts:  # (the tokenizer fails on an empty list)
        side = decoder.image_size
        vae_config = decoder.vae_config
        channels = vae_config.out_channels if vae_config else decoder.unet_config.out_channels
        return np.zeros((0, side, side, int(channels)), np.uint8)
    ids = tokenize(decoder, prompts)
    guided = guidance_scale != 1.0
    empty = tokenize(decoder, [""])[0]
    data_size = 1 if mesh is None else int(mesh.shape.get("data", 1))
    batch_size = max(data_size, math.ceil(batch_size / data_size) * data_size)
    sharding = None if mesh is None else NamedSharding(mesh, P("data"))
    replicated = None if mesh is None else NamedSharding(mesh, P())
    params = decoder.params if mesh is None else jax.device_put(decoder.params, replicated)

    batches = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    images = []
    for start in batches:
        n = min(batch_size, len(prompts) - start)
        index = np.arange(start, start + batch_size)
        batch_ids = ids[np.minimum(index, len(prompts) - 1)]
        x_T = initial_noise(decoder, seed, index)
        uncond = np.broadcast_to(empty, batch_ids.shape) if guided else None
        rng = variance_keys(seed, index)
        if sharding is not None:
            batch_ids, x_T, rng = jax.device_put((batch_ids, x_T, rng), sharding)
            uncond = None if uncond is None else jax.device_put(np.asarray(uncond), sharding)
        out = _sample_ids(
            decoder.spec, params, batch_ids, uncond, x_T, rng,
            num_steps=num_steps, guidance_scale=float(guidance_scale), eta=float(eta),
        )
        images.append(to_uint8(out)[:n])
    return np.concatenate(images)
