"""Where the trainable encoder meets the frozen decoder: images -> text states -> denoising loss.

`DeDiffusion` is a small static object (modules, the decoder's `DecoderSpec`, token layout) whose
methods are pure functions of (trainable params, frozen params, batch, rng): the train step, the
evaluation and `inference.TextEncoder` all call it. Nothing here owns parameters; the decoder's
weights arrive as `frozen["decoder"]`. `models.build.build_model` makes one from a config.

Token path (config `quantizer.token_path`):
- "fused" (default): vocabulary head + Gumbel-softmax + (soft @ E) in one custom-VJP op that never keeps
  the [B, N, V] relaxed one-hot (quantizer.fused_soft_token_embeddings), fed to the text encoder as
  token embeddings. The memory-lean path for V = 49,408.
- "soft": the reference formulation: soft tokens [B, N+2(+pad), V] with SOS/EOS through the text
  encoder's `soft_tokens` entry (soft @ E inside it). Same values and gradients, more memory.
Either way the gradient reaches the encoder THROUGH the token-embedding matrix E.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax.models import quantizer
from dediffusion_jax.models.encoder import DeDiffusionEncoder
from dediffusion_jax.t2i import clip_text, nn_blocks, schedules
from dediffusion_jax.t2i import vae as vae_lib
from dediffusion_jax.t2i.folder import DecoderSpec

Array = jax.Array
TOKEN_PATHS = ("fused", "soft")
REDUCTIONS = ("mean", "log_mean")
# Token statistics (entropy, distinct tokens) are computed on at most this many examples, so that the
# dense [B, N, V] logits they need stay small at V = 49,408.
STATS_EXAMPLES = 16
# Optional key of frozen["decoder"]: the UNet's convolution kernels flipped once for its input
# gradient (nn_blocks.input_gradient_kernels; models.build.frozen_unet_input_grad_kernels decides).
UNET_INPUT_GRAD_KERNELS = "unet_input_grad_kernels"


@dataclasses.dataclass(frozen=True, eq=False)
class DeDiffusion:
    """The De-Diffusion autoencoder: `encoder` (trainable module) + `decoder` (the frozen decoder's
    static spec; its weights are `frozen["decoder"]`).

    Param trees passed to the methods:
      trainable: the encoder params that get gradients ({"pooler", "vocab_head"} and, when the backbone
        is trained, "backbone");
      frozen: {"backbone"?: ..., "decoder": {"text_encoder", "unet", "vae"?, UNET_INPUT_GRAD_KERNELS?}}.
    """

    encoder: DeDiffusionEncoder
    decoder: DecoderSpec
    hard: bool = True
    token_path: str = "fused"
    # The fused path's chunking (quantizer.fused_soft_token_embeddings): rows per chunk of one batch
    # shard (0 = the largest under chunk_budget_mb) and how many ways the train step splits the batch
    # over devices (set from the mesh by the trainer; 1 = unsplit).
    rows_per_chunk: int = 0
    chunk_budget_mb: float = quantizer.CHUNK_BUDGET_MB
    batch_shards: int = 1
    diversity_weight: float = 0.0
    timestep_range: tuple[float, float] = (0.0, 1.0)  # fractions of the decoder's training timesteps
    # Timestep curriculum (off when None): the window slides linearly from timestep_range at step 0
    # to timestep_range_final at step timestep_ramp_steps, then stays there.
    timestep_range_final: tuple[float, float] | None = None
    timestep_ramp_steps: int = 0
    # How the per-example MSEs make the objective: "mean" (the decoder's own loss, the paper) or
    # "log_mean" (mean of log MSE: each example counts by its RELATIVE error, so high-noise examples,
    # whose MSE is many times larger, stop drowning the rest). Not in the paper.
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if not isinstance(self.decoder, DecoderSpec):
            raise TypeError(f"DeDiffusion.decoder must be a DecoderSpec (a loaded decoder's .spec; its "
                            f"params go in frozen['decoder']), got {type(self.decoder).__name__}")
        schedules.timestep_bounds(self.decoder.schedule, self.timestep_range)  # fail at build time
        if self.timestep_range_final is not None:
            schedules.timestep_bounds(self.decoder.schedule, self.timestep_range_final)
            if self.timestep_ramp_steps <= 0:
                raise ValueError("a timestep curriculum (loss.timestep_range_final) needs "
                                 f"timestep_ramp_steps > 0, got {self.timestep_ramp_steps}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"loss.reduction={self.reduction!r}; choose one of {REDUCTIONS}")
        if self.token_path not in TOKEN_PATHS:
            raise ValueError(f"quantizer.token_path={self.token_path!r}; choose one of {TOKEN_PATHS}")
        context = self.decoder.context_length
        n = self.num_tokens
        if n + 2 > context:
            raise ValueError(
                f"{n} tokens + SOS + EOS exceed the decoder's context length {context}; "
                f"use at most {context - 2} queries"
            )
        if self.encoder.config.vocab_size != self.decoder.text_config.vocab_size:
            raise ValueError(
                f"encoder vocab_size {self.encoder.config.vocab_size} != decoder vocabulary "
                f"{self.decoder.text_config.vocab_size}"
            )

    # -- layout ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.encoder.config.num_queries

    @property
    def special_ids(self) -> tuple[int, int, int]:
        tok = self.decoder.tokenizer
        return int(tok.bos_token_id), int(tok.eos_token_id), int(tok.pad_token_id)

    @property
    def exclusion_mask(self) -> np.ndarray:
        mask = np.zeros(self.encoder.config.vocab_size, bool)
        mask[list(self.encoder.config.excluded_ids)] = True
        return mask

    @staticmethod
    def merge(trainable: Any, frozen: Any) -> dict:
        """The encoder's full param tree from the trainable and frozen parts."""
        merged = dict(trainable)
        if "backbone" in frozen:
            merged["backbone"] = frozen["backbone"]
        return merged

    # -- encoder ----------------------------------------------------------------------------------
    def logits(self, trainable: Any, frozen: Any, images: Array) -> Array:
        """Masked float32 logits [B, N, V]."""
        return self.encoder.apply({"params": self.merge(trainable, frozen)}, images)

    def token_ids(self, trainable: Any, frozen: Any, images: Array) -> Array:
        """Inference: the discrete De-Diffusion tokens [B, N] (argmax, no noise)."""
        return quantizer.argmax_tokens(self.logits(trainable, frozen, images))

    def prompt_ids(self, token_ids: Array) -> Array:
        """[B, N] tokens -> [B, L] ids laid out as the decoder's tokenizer lays out a prompt."""
        bos, eos, pad = self.special_ids
        return quantizer.assemble_ids(token_ids, bos, eos, pad, self.decoder.context_length)

    def texts(self, token_ids: Array | np.ndarray) -> list[str]:
        """The De-Diffusion texts: argmax tokens detokenized."""
        return quantizer.detokenize(self.decoder.tokenizer, token_ids)

    # -- encoder -> text states ---------------------------------------------------------------------
    def text_states(
        self, trainable: Any, frozen: Any, images: Array, rng: Array, temperature: Array
    ) -> tuple[Array, Array]:
        """Relaxed tokens through the frozen text encoder: ([B, L, D] states, [B, N, width] features)."""
        dec = frozen["decoder"]
        params = self.merge(trainable, frozen)
        features = self.encoder.apply({"params": params}, images, method=DeDiffusionEncoder.features)
        table = clip_text.token_embedding_matrix(dec["text_encoder"])
        bos, eos, pad = self.special_ids
        context = self.decoder.context_length
        text_model = self.decoder.text_encoder
        if self.token_path == "fused":
            head = params["vocab_head"]["dense"]
            embeds = quantizer.fused_soft_token_embeddings(
                features, head["kernel"], head["bias"], self.exclusion_mask, rng, temperature,
                self.hard, table, rows_per_chunk=self.rows_per_chunk, chunk_budget_mb=self.chunk_budget_mb,
                batch_shards=self.batch_shards,
            )
            token_embeds = quantizer.assemble_token_embeddings(embeds, table, bos, eos, pad, context)
            out = text_model.apply(
                {"params": dec["text_encoder"]},
                token_embeds=token_embeds,
                eos_positions=jnp.full((images.shape[0],), self.num_tokens + 1, jnp.int32),
            )
        else:
            logits = self.encoder.apply(
                {"params": params}, features, method=lambda m, f: m.vocab_head(f)
            )
            probs = quantizer.gumbel_softmax(logits, rng, temperature, self.hard)
            soft = quantizer.assemble_soft_tokens(probs, bos, eos, pad, context)
            out = text_model.apply({"params": dec["text_encoder"]}, soft_tokens=soft)
        return out.last_hidden_state, features

    # -- the loss ---------------------------------------------------------------------------------
    def clean_sample(self, frozen: Any, batch: dict[str, Array], rng: Array) -> Array:
        """x_0 of the diffusion: the decoder view (pixel decoders) or its VAE latent.

        A batch may bring the latent instead of the decoder view: "latents" (ready diffusion latents,
        used as they are) or "latent_mean" + "latent_logvar" (the VAE posterior precomputed by
        `python -m dediffusion_jax.encode_latents`, read by the `latents:DIR` source): then z is
        sampled with `rng` and scaled exactly as the in-step encode does it, and the VAE is not run."""
        if "latents" in batch:
            return batch["latents"]
        if "latent_mean" in batch:
            dtype = self.decoder.dtype  # the in-step encode's output dtype, so eps is drawn alike
            return vae_lib.latents_from_posterior(
                self.decoder.vae_config, batch["latent_mean"].astype(dtype),
                batch["latent_logvar"].astype(dtype), rng)
        if not self.decoder.is_latent:
            return batch["decoder"]
        return vae_lib.latents_from_images(
            frozen["decoder"]["vae"], self.decoder.vae_config, batch["decoder"], rng,
            dtype=self.decoder.dtype)

    @staticmethod
    def unet_variables(frozen: Any) -> dict[str, Any]:
        """The frozen UNet's variables: its params, and its pre-flipped convolution kernels if given."""
        variables = {"params": frozen["decoder"]["unet"]}
        if UNET_INPUT_GRAD_KERNELS in frozen["decoder"]:
            variables[nn_blocks.INPUT_GRAD_KERNELS] = frozen["decoder"][UNET_INPUT_GRAD_KERNELS]
        return variables

    def loss(
        self,
        trainable: Any,
        frozen: Any,
        batch: dict[str, Array],
        rng: Array,
        temperature: Array,
        step: Array | int = 0,
    ) -> tuple[Array, dict[str, Array]]:
        """The decoder's own denoising loss (its prediction type and schedule), one t per example.

        `step` (the train step) only matters with a timestep curriculum."""
        k_gumbel, k_t, k_noise, k_vae = jax.random.split(rng, 4)
        states, features = self.text_states(trainable, frozen, batch["backbone"], k_gumbel, temperature)
        x0 = jax.lax.stop_gradient(self.clean_sample(frozen, batch, k_vae)).astype(jnp.float32)
        schedule = self.decoder.schedule
        if self.timestep_range_final is None:
            t = schedules.sample_timesteps(k_t, x0.shape[0], schedule, self.timestep_range)
        else:
            progress = jnp.asarray(step, jnp.float32) / self.timestep_ramp_steps
            t = schedules.sample_timesteps_moving(k_t, x0.shape[0], schedule, self.timestep_range,
                                                  self.timestep_range_final, progress)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t = schedules.add_noise(schedule, x0, noise, t)
        pred = self.decoder.unet.apply(self.unet_variables(frozen), x_t, t, states)
        target = schedules.training_target(schedule, x0, noise, t)
        per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
        denoising = jnp.mean(per_example)
        aux = {"features": features, "denoising_loss": denoising}
        objective = denoising if self.reduction == "mean" else jnp.mean(jnp.log(per_example + 1e-8))
        if not self.diversity_weight:
            return objective, aux
        aux["slot_usage_entropy"] = self.slot_usage_entropy(trainable, features)
        return objective + self.diversity_weight * (1.0 - aux["slot_usage_entropy"]), aux

    def slot_usage_entropy(self, trainable: Any, features: Array) -> Array:
        """How varied each slot's word is across the batch: the entropy of the batch-mean softmax of
        each slot, averaged over slots, as a fraction of log(allowed vocabulary) (0 = every image gets
        the same word, 1 = uniform use of the vocabulary).

        Not in the paper. `diversity_weight * (1 - this)` is the codebook-diversity term of wav2vec 2.0,
        an opt-in guard against the collapse seen when a small encoder is trained from scratch (every
        image mapped to one constant text). It costs a dense [B, N, V] softmax, so keep it off at
        V = 49,408 unless the batch per device is small.
        """
        logits = self.encoder.apply({"params": trainable}, features, method=lambda m, f: m.vocab_head(f))
        mean_probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).mean(axis=0)  # [N, V]
        safe = jnp.where(mean_probs > 0, mean_probs, 1.0)  # masked words: p = 0, no NaN gradient
        entropy = -jnp.sum(mean_probs * jnp.log(safe), axis=-1)
        allowed = int(self.encoder.config.vocab_size - self.exclusion_mask.sum())
        return jnp.mean(entropy) / np.log(max(allowed, 2))

    def token_stats(self, trainable: Any, features: Array) -> dict[str, Array]:
        """Mean per-slot entropy (nats) and distinct argmax tokens over a few examples."""
        few = jax.lax.stop_gradient(features[:STATS_EXAMPLES])
        logits = self.encoder.apply(
            {"params": trainable}, few, method=lambda m, f: m.vocab_head(f)
        )
        logp = jax.nn.log_softmax(logits, axis=-1)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1).mean()
        ids = jnp.argmax(logits, axis=-1).reshape(-1)
        used = jnp.zeros((logits.shape[-1],), jnp.int32).at[ids].set(1)
        return {"token_entropy": entropy, "distinct_tokens": used.sum()}
