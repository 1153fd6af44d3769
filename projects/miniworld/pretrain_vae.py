"""Pre-trains the miniature world's `AutoencoderKL`: the latent space of its second, latent decoder.

Why: the paper trains De-Diffusion against a pixel-space decoder and measures the text through
ANOTHER model, Stable Diffusion, a latent diffusion model run as a third-party tool. The world's
analogue of SD's VAE is this small KL autoencoder (16x16x3 images -> 8x8x4 latents), diffusers'
stock `AutoencoderKL` layout, trained on TRAIN-split world images with SD's recipe reduced to what
the world needs: reconstruction error plus a small KL term (SD: L1 + LPIPS + GAN, KL weight 1e-6;
the world's flat colours need no perceptual or adversarial term). The exported folder's
`scaling_factor` is 1 / std of the posterior samples, as SD's 0.18215 was chosen.

    python -m projects.miniworld.pretrain_vae --workdir workdirs/vae --out workdirs/vae_export
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

# The committed VAE is the `vae/` component of the world's latent decoder (float16, as its other
# weights); it was exported in float32 to `assets/vae` at git c51c28e and trained the UNet from there.
DEFAULT_DIR = Path(__file__).with_name("assets") / "sd_world" / "vae"
FREE_ARGS = ("workdir", "out", "log_every", "checkpoint_minutes", "stop_after_steps", "debug", "allow_changes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.pretrain_vae",
                                description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="checkpoints of the run (resumed when present)")
    p.add_argument("--out", required=True, help="the exported AutoencoderKL folder (float32)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--stop-after-steps", type=int, default=0, help="save and stop after N steps (resume later)")
    p.add_argument("--allow-changes", default="", help="arguments a resume may change, e.g. steps "
                                                       "(any other change is refused)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)  # before the heavy imports below

import jax
import jax.numpy as jnp
import numpy as np
import optax

from projects.miniworld import scenes
from dediffusion_jax.t2i import vae

# diffusers' stock AutoencoderKL with two levels: one downsample, 16x16 -> 8x8 (a 2x2 grid cell is
# 4x4 latents), 4 latent channels as SD's. 8 groups: 32 groups on 32 channels is a per-channel norm.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": scenes.IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std of the latents at export
}


def vae_config(scaling_factor: float = 1.0) -> vae.VAEConfig:
    return vae.VAEConfig.from_dict({**VAE_CONFIG, "scaling_factor": scaling_factor})


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(q(z|x) || N(0, I)) per example, summed over latent elements (diffusers' DiagonalGaussian)."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


class VAETrainer:
    """The model, optimizer and loss of one run, as a task of the core's trainer spine."""

    def __init__(self, args: argparse.Namespace):
        from dediffusion_jax.train import trainer as spine

        self.args = args
        self.config = vae_config()
        self.model = vae.AutoencoderKL(self.config)
        self.tx = spine.adam(args.lr, args.lr * 0.02, min(100, args.steps // 10), args.steps)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.args.seed, step])
        return {"images": scenes.images_of(scenes.sample_indices(rng, self.args.batch, "train"))}

    def init(self, key: jax.Array, inputs: Any) -> dict:
        params = self.model.init(key, *vae.dummy_inputs(self.config))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    def loss(self, params: Any, images: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
        mean, logvar = self.model.apply({"params": params}, images, method=vae.AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        recon = self.model.apply({"params": params}, z, method=vae.AutoencoderKL.decode)
        mse = jnp.mean(jnp.square(recon - images))
        kl = jnp.mean(kl_divergence(mean, logvar)) / images[0].size
        return mse + self.args.kl_weight * kl, {"mse": mse, "kl": kl}

    def step_fn(self, state: dict, frozen: Any, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        rng = jax.random.fold_in(rng, state["step"])
        (loss, parts), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], batch["images"], rng)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({"step": state["step"] + 1, "params": params, "opt_state": opt_state},
                {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)})

    def task(self) -> Any:
        from dediffusion_jax.train import trainer as spine

        return spine.Task(init=self.init, step_fn=self.step_fn, data=spine.StepIndexedIterator(self.batch),
                          example_batch=spine.example_of(self.batch(0)), seed=self.args.seed,
                          rng_seed=self.args.seed + 1, checkpoint_json=lambda: {"args": vars(self.args)},
                          config_item="args", free_keys=FREE_ARGS)


def latent_std(params: Any, config: vae.VAEConfig, n: int = 2048, seed: int = 0) -> float:
    """Std of posterior samples of `n` train images: `scaling_factor` = 1 / this (SD's recipe)."""
    rng = np.random.default_rng([seed, 10**6])
    images = jnp.asarray(scenes.images_of(scenes.sample_indices(rng, n, "train")))
    z = jax.jit(lambda x, k: vae.latents_from_images(params, config, x, k))(images, jax.random.key(seed))
    return float(jnp.std(z))


def reconstruction_quality(params: Any, config: vae.VAEConfig, num_scenes: int = 364) -> dict[str, float]:
    """Held-out scenes through encode (posterior mean) -> decode: PSNR, and the world classifier's
    accuracy on the reconstructions (the latent decoder can draw no better than its VAE decodes)."""
    from projects.miniworld import classifier, metrics

    idx = scenes.evaluation_indices(num_scenes)
    images = jnp.asarray(scenes.images_of(idx))
    round_trip = jax.jit(lambda x: vae.images_from_latents(params, config, vae.latents_from_images(params, config, x)))
    recon = round_trip(images)
    recon = np.clip(np.asarray(recon), -1.0, 1.0)
    mse = float(np.mean(np.square((recon - np.asarray(images)) / 2.0)))  # on [0, 1]
    clf_params, clf_config = classifier.load_classifier()
    scores = metrics.score_images(clf_params, recon, idx, clf_config)
    return {"psnr_db": round(float(10 * np.log10(1.0 / max(mse, 1e-12))), 2),
            **{k: round(float(v), 4) for k, v in scores.items()}, "scenes": int(len(idx))}


def export(params: Any, out: str | Path, info: dict) -> Path:
    """A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, float32)."""
    from dediffusion_jax import weights
    from dediffusion_jax.t2i import convert

    scale = 1.0 / latent_std(params, vae_config())
    config = vae_config(round(scale, 5))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    tensors = {k: np.asarray(v, np.float32) for k, v in convert.flax_to_torch(jax.device_get(params)).items()}
    weights.save(tensors, out / "diffusion_pytorch_model.safetensors")
    info = {**info, "scaling_factor": config.scaling_factor,
            "reconstruction_heldout": reconstruction_quality(params, config)}
    (out / "TRAINING.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(f"reconstruction of held-out scenes: {json.dumps(info['reconstruction_heldout'])}", flush=True)
    return out


def load_vae(folder: str | Path = DEFAULT_DIR) -> tuple[vae.VAEConfig, Any]:
    """(config, params) of an exported folder, through the core's diffusers-folder loader."""
    from dediffusion_jax.t2i import folder as folder_lib

    folder = Path(folder)
    config = folder_lib._config_from(vae.VAEConfig, folder / "config.json")
    return config, folder_lib._load_component(folder, vae.AutoencoderKL(config), vae.dummy_inputs(config),
                                              prepare=vae.squeeze_legacy_attention, ignore=vae.TORCH_IGNORE,
                                              aliases=vae.TORCH_ALIASES)


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dediffusion_jax.train import trainer as spine

    trainer = VAETrainer(args)
    workdir = Path(args.workdir)
    timing_path = workdir / "wall_seconds.json"
    wall_before = json.loads(timing_path.read_text())["seconds"] if timing_path.exists() else 0.0
    start = time.time()
    run = spine.Trainer(trainer.task(), workdir, spine.Settings(
        total_steps=args.steps, log_every=args.log_every, progress_every=args.log_every,
        checkpoint_minutes=args.checkpoint_minutes, keep=2, tensorboard=False,
        stop_after_steps=args.stop_after_steps,
        allow_changes=tuple(k for k in args.allow_changes.split(",") if k), allow_changes_flag="--allow-changes"))
    summary = run.run()
    wall = wall_before + time.time() - start
    timing_path.write_text(json.dumps({"seconds": wall}))
    if summary["preempted"] or summary["step"] < args.steps:
        print(f"stopped at step {summary['step']}; run the same command again to resume", flush=True)
        return 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    log = [{k: round(r[k], 6) for k in ("step", "loss", "mse", "kl") if k in r} for r in records if "loss" in r]
    info = {"args": vars(args), "steps": args.steps, "train_wall_seconds": round(wall, 1), "log": log[-5:],
            "jax": jax.__version__, "split": "train"}
    out = export(jax.device_get(run.state["params"]), args.out, info)
    print(f"exported {out} ({wall:.0f} s of training)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
