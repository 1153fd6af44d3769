"""Pre-trains the miniature world's text-to-image decoder and exports it as a diffusers folder.

The decoder is the same architecture family as Stable Diffusion (CLIP text transformer + a
UNet2DConditionModel, here in pixel space with v-prediction as the paper's decoder), trained from
scratch on (scene, caption) pairs of the world's TRAIN split with the caption mix of
`captions.training_caption` (10% empty for classifier-free guidance). It runs for a long time on a
CPU, so it is built to be stopped and resumed: it trains on the core's trainer spine
(dediffusion_jax/train/trainer.py) with orbax checkpoints every `--checkpoint-minutes`, an exact resume
(the data of step n is a function of (seed, n)), SIGTERM/SIGINT saving before exit, metrics.jsonl and
TensorBoard in the workdir, and the quality gate as an evaluator (eval/gate/KEY).

    python -m projects.miniworld.pretrain_decoder --workdir workdirs/decoder --steps 12000
    python -m projects.miniworld.pretrain_decoder --workdir workdirs/decoder --export DIR

The committed decoder (v4) conditions on the world CLIP's text tower, frozen, as Stable Diffusion
conditions on CLIP's: `--text-encoder-from projects/miniworld/assets/backbone
--freeze-text-encoder` (assets/decoder/README.md has its exact commands).

The exported folder is loaded by `t2i.folder.load_decoder` exactly like a real Stable Diffusion folder.

`--vae FOLDER` trains the world's SECOND decoder, of the other family: a latent diffusion model (a
stock Stable Diffusion layout: the world `AutoencoderKL` of `pretrain_vae`, frozen; a stock UNet of
another architecture, `LATENT_UNET_CONFIG`; the same frozen world-CLIP text tower). It is the world's
third-party text-to-image tool, as SD2 is the paper's (assets/sd_world/README.md):

    python -m projects.miniworld.pretrain_decoder --workdir workdirs/sd_world --vae workdirs/vae_export \
        --text-encoder-from projects/miniworld/assets/backbone --freeze-text-encoder --seed 1 ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early


# Arguments a resume may change freely: where and how often to log, evaluate, save, stop and export;
# the init sources (read on a fresh start only). Any other change (steps, lr, batch, seed, the caption
# mix, ...) alters the optimisation and is refused unless --allow-changes names it.
FREE_ARGS = ("workdir", "log_every", "eval_every", "checkpoint_minutes", "stop_after_minutes",
             "stop_after_steps", "export", "export_dtype", "gate_guidance", "debug", "allow_changes",
             "init_from", "text_encoder_from")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=12000, help="total steps (sets the lr decay)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-end", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--soup-fraction", type=float, default=0.0,
                   help="fraction of word-soup captions (captions.word_soup_caption); v3 fine-tuned with 0.25")
    p.add_argument("--mix-fraction", type=float, default=0.0,
                   help="fraction of captions with word embeddings blended with random words "
                        "(token_mixing_for_step); the word-mixing experiment of docs/miniworld.md used 0.3")
    p.add_argument("--init-from", help="a decoder folder of this architecture to start from (a fine-tune; "
                                       "only when the workdir has no checkpoint yet)")
    p.add_argument("--text-encoder-from",
                   help="a transformers CLIP folder whose text tower starts the text encoder, e.g. the world "
                        "CLIP projects/miniworld/assets/backbone (v4 used it, frozen)")
    p.add_argument("--vae", help="a world AutoencoderKL folder (pretrain_vae): train a LATENT decoder, a stock "
                                 "Stable Diffusion layout (LATENT_UNET_CONFIG), on its latents; the VAE is frozen")
    p.add_argument("--freeze-text-encoder", action="store_true",
                   help="train the UNet only (Stable Diffusion's recipe; the text encoder is out of the optimizer)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=2000, help="gate evaluation period (0 = never)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--stop-after-minutes", type=float, default=0, help="save and stop (0 = no limit)")
    p.add_argument("--stop-after-steps", type=int, default=0, help="save and stop after N steps (0 = no limit)")
    p.add_argument("--export", help="write the EMA decoder of the latest checkpoint to this folder")
    p.add_argument("--export-dtype", default="float16", choices=("float16", "float32"),
                   help="weights dtype of the exported folder (float16 halves it; loading upcasts)")
    p.add_argument("--gate-guidance", default="3", help="guidance scales of the gate evaluation, e.g. 1,1.5,2,3")
    p.add_argument("--allow-changes", default="", help="training arguments a resume may change, e.g. "
                                                       "steps,lr (any other change is refused)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)  # before the heavy imports below

import jax
import jax.numpy as jnp
import numpy as np
import optax

from projects.miniworld import captions, scenes
from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax.t2i import clip_text, schedules, unet
from dediffusion_jax.t2i.folder import DecoderSpec, LoadedDecoder, save_decoder

TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
UNET_CONFIG = {
    "sample_size": scenes.IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    # Cross-attention to the words at every resolution (16, 8, 4) and in the mid block: the
    # calibration found that binding colour/shape to position needs text at every level.
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 4,  # diffusers' name; it is the number of heads
    "use_linear_projection": True,
    "cross_attention_dim": 128,
    # Pooled text added to the time embedding (diffusers' "text" addition): every ResBlock sees
    # the whole prompt (background, which colours are present), not only the attention layers.
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
    # Project extension: learned positions on the attention tokens. Without it the first decoder
    # (stock UNet, 6,500 steps) drew the right objects in the wrong cells: position words need
    # queries that know where they are (the calibration's working prototype had this).
    "attention_position_embedding": True,
    "norm_num_groups": 8,  # 32 groups on 32 channels would be a per-channel (instance) norm
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}
# The latent decoder's UNet (with --vae): diffusers' STOCK UNet2DConditionModel, nothing the
# diffusers classes would ignore, and another architecture than the pixel one: 4-channel 8x8 latents,
# levels at 8, 4 and 2 latents (the last one a 2x2 grid: one position per scene cell), 48/96/96
# channels (4.1M parameters: the world's assets stay under 30 MB), per-level head counts. Without the learned attention
# positions of the pixel decoder, positions come from the zero padding of the convolutions, which
# tells the four cells apart at the 2x2 level (as Stable Diffusion learns layout).
LATENT_UNET_CONFIG = {
    "sample_size": scenes.IMAGE_SIZE // 2,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [48, 96, 96],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": [4, 6, 6],  # diffusers' name; it is the number of heads per level
    "use_linear_projection": True,
    "cross_attention_dim": 128,
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
    "norm_num_groups": 16,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    # No x0 clipping (as Stable Diffusion): DDIMScheduler clips x0 but keeps the unclipped eps, and
    # with guidance that mismatch wrecked this decoder's samples (w=3, 64 held-out scenes: background
    # 0.52 and colour 0.13 with clipping, 0.95 and 0.63 without; docs/miniworld.md).
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


def build_configs(tokenizer: Any, latent: bool = False) -> tuple[Any, Any, Any]:
    text = clip_text.CLIPTextConfig.from_dict(
        {
            **TEXT_CONFIG,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": int(tokenizer.model_max_length),
            "bos_token_id": int(tokenizer.bos_token_id),
            "eos_token_id": int(tokenizer.eos_token_id),
            "pad_token_id": int(tokenizer.pad_token_id),
        }
    )
    unet_config = unet.UNetConfig.from_dict(LATENT_UNET_CONFIG if latent else UNET_CONFIG)
    # The latent decoder is a stock Stable Diffusion folder: diffusers' pipeline warns about (and
    # rewrites) steps_offset != 1; with "trailing" spacing the offset changes no timestep.
    scheduler = {**SCHEDULER_CONFIG, "steps_offset": 1} if latent else SCHEDULER_CONFIG
    return text, unet_config, schedules.NoiseSchedule.from_dict(scheduler)


def batch_for_step(seed: int, step: int, batch: int, tokenizer: Any,
                   p_soup: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Images [B,16,16,3] and caption ids [B,L] of one step: a pure function of (seed, step, p_soup)."""
    rng = np.random.default_rng([seed, step])
    images, batch_scenes = scenes.sample_batch(rng, batch, "train")
    fillers = world_tokenizer.DISTRACTORS
    texts = [captions.training_caption(s, rng, p_soup, fillers) for s in batch_scenes]
    return images, world_tokenizer.encode(tokenizer, texts)


def token_mixing_for_step(seed: int, step: int, ids: np.ndarray, p_mix: float, tokenizer: Any,
                          p_token: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(other ids [B, L], weights [B, L]) that blend word embeddings: e = (1 - w) E[id] + w E[other].

    In a `p_mix` fraction of captions each world word (not a special token, not punctuation) is, with
    probability `p_token`, blended with a random word of the encoder's vocabulary (world words and
    distractors), w ~ U(0, 1). Why: the De-Diffusion encoder learns through a straight-through Gumbel
    estimator, i.e. through the decoder's gradient with respect to a token's embedding, which only says
    something about OTHER words if the decoder's response between word embeddings is meaningful. A
    decoder trained on one-hot tokens alone has no reason to be (docs/miniworld.md, "The
    straight-through signal"). Drawn from its own random stream: p_mix = 0 changes no other draw.
    """
    rng = np.random.default_rng([seed, step, 1])
    words = np.asarray([tokenizer.convert_tokens_to_ids(f"{w}</w>")
                        for w in captions.WORLD_WORDS + world_tokenizer.DISTRACTORS])
    is_word = np.isin(ids, words)
    chosen = (rng.random(ids.shape[0]) < p_mix)[:, None] & (rng.random(ids.shape) < p_token) & is_word
    weights = np.where(chosen, rng.random(ids.shape), 0.0).astype(np.float32)
    return words[rng.integers(0, len(words), ids.shape)].astype(ids.dtype), weights


class TextTowerError(errors.UserError, ValueError):
    """A --text-encoder-from checkpoint that does not fit the decoder's text encoder."""


def text_tower_of(folder: str | Path, text_config: clip_text.CLIPTextConfig) -> dict:
    """The CLIP text tower (`text_model.*` weights) of a transformers CLIPModel or CLIPTextModel folder
    (config.json + model.safetensors), as the decoder's text encoder params.

    Why: Stable Diffusion conditions on a frozen, contrastively pre-trained CLIP text encoder. Trained
    jointly from scratch, the world decoder's text encoder never learned to tell `left` from `right`
    (docs/miniworld.md, "What failed in v3: left and right"); the world CLIP's text tower
    (assets/backbone) does, since it must to match scenes to captions.
    """
    from dediffusion_jax import weights as weights_lib

    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"--text-encoder-from {folder}: no {f.name} (a transformers CLIP folder, "
                                    "safetensors weights)")
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)  # CLIPModel nests the text tower's config
    wanted = {**TEXT_CONFIG, "vocab_size": text_config.vocab_size,
              "max_position_embeddings": text_config.max_position_embeddings,
              "eos_token_id": text_config.eos_token_id}
    differ = {k: (config.get(k), v) for k, v in wanted.items() if config.get(k) != v}
    if differ:
        raise TextTowerError(f"--text-encoder-from {folder}: its text config differs from the decoder's "
                             f"(key: (checkpoint, decoder)) {differ}")
    state = {k: v for k, v in weights_lib.read_file(weights).items() if k.startswith("text_model.")}
    if not state:
        raise TextTowerError(f"--text-encoder-from {folder}: no text_model.* weights in {weights.name}")
    params = clip_text.params_from_torch(state, text_config, source=str(weights))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


class Trainer:
    """The modules, optimizer and loss of one pre-training run, and its task for the core's trainer
    spine (dediffusion_jax/train/trainer.py), which owns the loop, checkpoints and logging."""

    def __init__(self, args: argparse.Namespace):
        from dediffusion_jax.train import trainer as spine

        self.args = args
        self.tokenizer = world_tokenizer.load_tokenizer()
        self.vae_config, self.vae_params = None, None
        if getattr(args, "vae", None):  # a latent decoder: the frozen world VAE maps images to latents
            from projects.miniworld import pretrain_vae

            self.vae_config, self.vae_params = pretrain_vae.load_vae(args.vae)
        self.text_config, self.unet_config, self.schedule = build_configs(self.tokenizer, self.vae_config is not None)
        self.text_model = clip_text.CLIPTextModel(config=self.text_config)
        self.unet_model = unet.UNet2DConditionModel(config=self.unet_config)
        # clip(1) -> Adam -> warmup-cosine lr, from the core's optimizer module.
        self.optimizer = spine.adam(args.lr, args.lr_end, args.warmup, args.steps)
        # A frozen text encoder (Stable Diffusion's recipe) stays out of the optimizer and the grads.
        self.trainable = ("unet",) if getattr(args, "freeze_text_encoder", False) else ("text_encoder", "unet")
        self._step = jax.jit(self.step_fn, donate_argnums=(0,))

    def random_params(self, key: jax.Array) -> dict[str, Any]:
        k_text, k_unet = jax.random.split(key)
        return {
            "text_encoder": self.text_model.init(k_text, *clip_text.dummy_inputs(self.text_config))["params"],
            "unet": self.unet_model.init(k_unet, *unet.dummy_inputs(self.unet_config))["params"],
        }

    def init_inputs(self) -> dict[str, Any] | None:
        """Weights that start the run instead of the random ones: `--init-from` (text encoder + UNet of
        an exported decoder), `--text-encoder-from` (a CLIP text tower)."""
        inputs: dict[str, Any] = {}
        if getattr(self.args, "init_from", None):
            like = jax.eval_shape(self.random_params, jax.random.key(0))
            inputs.update(self._weights_of(self.args.init_from, like))
        if getattr(self.args, "text_encoder_from", None):
            inputs["text_encoder"] = text_tower_of(self.args.text_encoder_from, self.text_config)
        return inputs or None

    def init(self, key: jax.Array, inputs: dict[str, Any] | None) -> dict[str, Any]:
        """A fresh state: random weights (or `inputs`), their EMA copy, new optimizer state."""
        params = {**self.random_params(key), **(inputs or {})}
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "ema": jax.tree_util.tree_map(jnp.copy, params),
            "opt_state": self.optimizer.init({k: params[k] for k in self.trainable}),
        }

    def init_state(self) -> dict[str, Any]:
        """The fresh state of this run, on the default device (the spine builds it sharded)."""
        return jax.jit(self.init)(jax.random.key(self.args.seed), self.init_inputs())

    def text_states(self, params: Any, ids: jax.Array, mixing: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        """Text encoder states of the captions, with word embeddings blended where `mixing` says."""
        text_params = {"params": params["text_encoder"]}
        if mixing is None:
            return self.text_model.apply(text_params, input_ids=ids).last_hidden_state
        other, w = mixing
        table = clip_text.token_embedding_matrix(params["text_encoder"])
        embeds = (1.0 - w[..., None]) * table[ids] + w[..., None] * table[other]
        eos = clip_text.eos_positions_from_ids(ids, self.text_config.eos_token_id)
        return self.text_model.apply(text_params, token_embeds=embeds, eos_positions=eos).last_hidden_state

    def loss_fn(self, params: Any, images: jax.Array, ids: jax.Array, rng: jax.Array,
                mixing: tuple[jax.Array, jax.Array] | None = None, vae_params: Any = None) -> jax.Array:
        k_t, k_noise, k_latent = jax.random.split(rng, 3)
        if self.vae_config is not None:  # a posterior sample of the frozen VAE, as SD's training scripts
            from dediffusion_jax.t2i import vae as vae_lib

            images = vae_lib.latents_from_images(vae_params, self.vae_config, images, k_latent)
        b = images.shape[0]
        t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, images.shape)
        x_t = schedules.add_noise(self.schedule, images, noise, t)
        states = self.text_states(params, ids, mixing)
        pred = self.unet_model.apply({"params": params["unet"]}, x_t, t, states)
        target = schedules.training_target(self.schedule, images, noise, t)
        return jnp.mean(jnp.square(pred - target))

    def step_fn(self, state: dict, frozen: Any, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        """The spine's step: denoising loss of the trainable parts, Adam, EMA (decay -> 0.999)."""
        rng = jax.random.fold_in(rng, state["step"])
        mixing = (batch["other"], batch["weights"]) if "other" in batch else None
        trained = {k: state["params"][k] for k in self.trainable}
        frozen_params = {k: v for k, v in state["params"].items() if k not in self.trainable}
        loss, grads = jax.value_and_grad(
            lambda p: self.loss_fn({**frozen_params, **p}, batch["images"], batch["ids"], rng, mixing,
                                   None if frozen is None else frozen.get("vae")))(trained)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], trained)
        trained = optax.apply_updates(trained, updates)
        params = {**frozen_params, **trained}
        n = state["step"].astype(jnp.float32)
        decay = jnp.minimum(0.999, (1.0 + n) / (10.0 + n))
        # Frozen weights are copied, not averaged: an average of a constant drifts by rounding.
        ema = {**frozen_params, **jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p,
                                                         {k: state["ema"][k] for k in self.trainable}, trained)}
        new = {"step": state["step"] + 1, "params": params, "ema": ema, "opt_state": opt_state}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of `step`: a pure function of (seed, step) and the caption-mix flags."""
        images, ids = batch_for_step(self.args.seed, step, self.args.batch, self.tokenizer,
                                     self.args.soup_fraction)
        out = {"images": images, "ids": ids}
        if self.args.mix_fraction:
            out["other"], out["weights"] = token_mixing_for_step(
                self.args.seed, step, ids, self.args.mix_fraction, self.tokenizer)
        return out

    def step(self, state: dict, step: int) -> tuple[dict, dict]:
        """One step outside the spine (tests); `step` must equal state["step"]."""
        batch = {k: jnp.asarray(v) for k, v in self.batch(step).items()}
        return self._step(state, self.frozen(), batch, jax.random.key(self.args.seed + 1))

    def frozen(self) -> dict | None:
        """Weights the step reads but never trains, outside the state: the latent decoder's VAE."""
        return None if self.vae_params is None else {"vae": self.vae_params}

    def task(self, evaluators: list | None = None, checkpoint_json: dict | None = None) -> Any:
        """This run as a task of the trainer spine; the evaluators see the EMA params."""
        from dediffusion_jax.train import trainer as spine

        return spine.Task(
            init=self.init, step_fn=self.step_fn, data=spine.StepIndexedIterator(self.batch),
            example_batch=spine.example_of(self.batch(0)), seed=int(self.args.seed),
            rng_seed=int(self.args.seed) + 1, init_inputs=self.init_inputs(), frozen=self.frozen(),
            view=lambda state, frozen: state["ema"], evaluators=evaluators or [],
            checkpoint_json=(lambda: checkpoint_json) if checkpoint_json is not None else None,
            # A resume with other training arguments is refused unless --allow-changes names them.
            config_item="args" if checkpoint_json and "args" in checkpoint_json else None,
            free_keys=FREE_ARGS)

    @staticmethod
    def _weights_of(folder: str, like: dict) -> dict:
        """The text encoder and UNet of a decoder folder; it must have this script's architecture."""
        from dediffusion_jax.t2i.folder import DecoderFolderError, load_decoder

        loaded = load_decoder(folder, load_vae=False).params
        loaded = {k: loaded[k] for k in ("text_encoder", "unet")}
        shapes = lambda tree: jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)  # noqa: E731
        if shapes(loaded) != shapes(like):
            raise DecoderFolderError(f"--init-from {folder}: its text encoder / UNet differ from this "
                                     "script's TEXT_CONFIG / UNET_CONFIG")
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), loaded)

    def decoder(self, params: Any) -> LoadedDecoder:
        """The decoder with `params`: a new pair around the run's one static spec, so sampling
        compiles once."""
        if not hasattr(self, "_decoder_spec"):
            self._decoder_spec = DecoderSpec(
                None, self.text_config, self.unet_config, self.vae_config, self.schedule, self.tokenizer)
        weights = {"text_encoder": params["text_encoder"], "unet": params["unet"]}
        if self.vae_params is not None:
            weights["vae"] = self.vae_params
        return LoadedDecoder(self._decoder_spec, weights)


def evaluate_gate(trainer: Trainer, params: Any, num_scenes: int = 128, guidance: float = 3.0) -> dict:
    """The calibration's quality gate: held-out scenes drawn from their FULL captions, classified; and
    `short_caption_object`: how often a short caption's object ('green circle') is drawn at all."""
    from projects.miniworld import classifier, metrics
    from dediffusion_jax.t2i import pipeline

    idx = scenes.evaluation_indices(num_scenes)
    held_out = [scenes.scene_from_index(int(i)) for i in idx]
    clf_params, clf_config = classifier.load_classifier()

    def draw(texts: list[str]) -> np.ndarray:
        images = pipeline.generate(trainer.decoder(params), texts, num_steps=25, guidance_scale=guidance,
                                   seed=1234, batch_size=64)
        return images.astype(np.float32) / 127.5 - 1.0

    gate = metrics.score_images(clf_params, draw([captions.full_caption(s) for s in held_out]), idx, clf_config)
    short = draw([captions.short_caption(s) for s in held_out])
    gate["short_caption_object"] = metrics.named_object_drawn(clf_params, short, held_out, clf_config)
    return gate


class GateEvaluator:
    """`evaluate_gate` as an evaluator of the spine: eval/gate/KEY every `every_steps` and at the end."""

    def __init__(self, trainer: Trainer, every_steps: int, guidance: float, name: str = "gate"):
        self.trainer, self.every_steps, self.guidance, self.name = trainer, every_steps, guidance, name

    def run(self, ema_params: Any) -> Any:
        from dediffusion_jax.evaluation.evaluators import EvalResult

        gate = evaluate_gate(self.trainer, ema_params, guidance=self.guidance)
        print(f"gate: {json.dumps(gate)}", flush=True)
        return EvalResult(scalars=gate)


def export(trainer: Trainer, params: Any, out: Path, info: dict, weights_dtype: str = "float16") -> Any:
    """Writes the decoder folder; returns the params as loaded back from it (what users will get)."""
    from dediffusion_jax.t2i.folder import load_decoder

    save_decoder(trainer.decoder(params), out, weights_dtype=np.dtype(weights_dtype))
    (out / "TRAINING.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(f"exported decoder ({weights_dtype} weights) to {out}", flush=True)
    return load_decoder(out).params


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    history_path = workdir / "args_history.jsonl"
    if history_path.exists():  # the checkpoint's layout (optimizer state) follows this flag
        previous = json.loads(history_path.read_text().splitlines()[-1])
        if args.export:
            args.freeze_text_encoder = bool(previous.get("freeze_text_encoder"))
        elif bool(previous.get("freeze_text_encoder")) != args.freeze_text_encoder:
            print(f"error: {workdir} was trained with freeze_text_encoder="
                  f"{bool(previous.get('freeze_text_encoder'))}; resume with the same setting",
                  file=sys.stderr)
            return 2
    if not args.export:  # the training run's record; an export must not overwrite it
        (workdir / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        with (workdir / "args_history.jsonl").open("a") as f:  # every invocation (e.g. a fine-tune phase)
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **vars(args)}) + "\n")
    from dediffusion_jax.train import trainer as spine

    trainer = Trainer(args)
    guidance = float(args.gate_guidance.split(",")[0])
    evaluators = [GateEvaluator(trainer, args.eval_every, guidance)] if args.eval_every and not args.export else []
    settings = spine.Settings(
        total_steps=args.steps, log_every=args.log_every, progress_every=args.log_every,
        checkpoint_minutes=args.checkpoint_minutes, keep=2, tensorboard=True,
        stop_after_steps=args.stop_after_steps, stop_after_minutes=args.stop_after_minutes,
        allow_changes=tuple(k for k in args.allow_changes.split(",") if k), allow_changes_flag="--allow-changes")
    run = spine.Trainer(trainer.task(evaluators, {"args": vars(args)}), workdir, settings)
    timing_path = workdir / "wall_seconds.json"
    wall_before = json.loads(timing_path.read_text())["seconds"] if timing_path.exists() else 0.0

    if args.export:
        state = run.restore_latest()
        if state is None:
            print(f"error: no checkpoint in {workdir} to export", file=sys.stderr)
            return 2
        args_path = workdir / "args.json"  # the (last) training invocation's arguments
        train_args = json.loads(args_path.read_text()) if args_path.exists() else None
        # every training phase (e.g. a fine-tune) is in history_path
        history = ([json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
                   if history_path.exists() else None)
        info = {"steps": int(state["step"]), "args": train_args, "args_history": history,
                "train_wall_seconds": wall_before, "weights_dtype": args.export_dtype}
        out = Path(args.export)
        exported = export(trainer, jax.device_get(state["ema"]), out, info, args.export_dtype)
        if args.eval_every:  # the gate of the exported (e.g. float16) weights, as users load them
            info["gate"] = {
                w: evaluate_gate(trainer, exported, guidance=float(w))
                for w in args.gate_guidance.split(",")
            }
            print(json.dumps(info["gate"]), flush=True)
            (out / "TRAINING.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return 0

    latest = run.latest_step()
    if latest is not None:
        print(f"resumed from step {latest}", flush=True)
    start = time.time()
    summary = run.run()  # SIGTERM/SIGINT: finish the step, save, return
    timing_path.write_text(json.dumps({"seconds": wall_before + time.time() - start}))
    print(f"saved step {summary['step']} to {workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
