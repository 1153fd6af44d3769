"""The miniature world's attribute classifier: the judge of reconstructions and its feature network.

Real image models (Inception for FID, captioners for attribute checks) know nothing of this world, so
the world brings its own: a small convnet trained on TRAIN scenes only (the held-out 10% stay unseen)
that reads background, per-cell occupancy, colour and shape. Its predictions score whether a generated
image kept each attribute; its penultimate layer gives the world's Fréchet distance. Noise, blur and
mild colour jitter during training make it judge imperfect generated images, not only clean renders.

Train: `python -m projects.miniworld.classifier --out DIR --steps 800` (see assets/classifier).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

DEFAULT_DIR = Path(__file__).with_name("assets") / "classifier"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the miniature world's attribute classifier.")
    p.add_argument("--out", default=str(DEFAULT_DIR))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workdir", help="checkpoints of the run (resumed when present); default: a temporary folder")
    p.add_argument("--stop-after-steps", type=int, default=0, help="save and stop after N steps (resume later)")
    p.add_argument("--allow-changes", default="", help="arguments a resume may change, e.g. steps,lr "
                                                       "(any other change is refused)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)  # before the heavy imports below

import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn
import optax
from flax import traverse_util

from projects.miniworld import scenes as S

Params = Any


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture: convs (width, stride), then a dense feature layer, then linear heads."""

    widths: tuple[int, ...] = (32, 64, 128, 128, 256)
    strides: tuple[int, ...] = (1, 1, 2, 1, 2)
    feature_dim: int = 64

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return cls(tuple(d["widths"]), tuple(d["strides"]), int(d["feature_dim"]))

    def to_dict(self) -> dict:
        return {"widths": list(self.widths), "strides": list(self.strides), "feature_dim": self.feature_dim}


# Head name -> number of classes; per-cell heads output [B, 4, classes].
HEADS = {"background": len(S.BACKGROUNDS), "occupied": 2, "colour": len(S.COLOURS), "shape": len(S.SHAPES)}


class AttributeClassifier(nn.Module):
    """Images [B, 16, 16, 3] in [-1, 1] -> (features [B, F], logits per head)."""

    config: ClassifierConfig = ClassifierConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.config
        for i, (w, s) in enumerate(zip(c.widths, c.strides)):
            x = nn.gelu(nn.Conv(w, (3, 3), strides=(s, s), padding="SAME", name=f"conv_{i}")(x))
        x = x.reshape(x.shape[0], -1)
        feats = nn.gelu(nn.Dense(c.feature_dim, name="features")(x))
        logits = {"background": nn.Dense(HEADS["background"], name="head_background")(feats)}
        for k in ("occupied", "colour", "shape"):
            logits[k] = nn.Dense(S.NUM_CELLS * HEADS[k], name=f"head_{k}")(feats).reshape(-1, S.NUM_CELLS, HEADS[k])
        return feats, logits


@functools.lru_cache(maxsize=None)
def _apply_fn(config: ClassifierConfig):
    model = AttributeClassifier(config)
    return jax.jit(model.apply)


def init_params(config: ClassifierConfig, seed: int = 0) -> Params:
    x = jnp.zeros((1, S.IMAGE_SIZE, S.IMAGE_SIZE, 3), jnp.float32)
    return AttributeClassifier(config).init(jax.random.PRNGKey(seed), x)["params"]


def num_params(params: Params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def features(params: Params, images: np.ndarray | jax.Array, config: ClassifierConfig = ClassifierConfig()) -> np.ndarray:
    """Penultimate-layer features [B, F] for the world's Fréchet distance."""
    feats, _ = _apply_fn(config)({"params": params}, jnp.asarray(images, jnp.float32))
    return np.asarray(feats)


def predict(params: Params, images: np.ndarray | jax.Array, config: ClassifierConfig = ClassifierConfig()) -> dict[str, np.ndarray]:
    """Attributes read from images: background [B]; occupied [B, 4] bool; colour, shape [B, 4] (argmax
    at every cell, meaningful where occupied)."""
    _, logits = _apply_fn(config)({"params": params}, jnp.asarray(images, jnp.float32))
    out = {k: np.asarray(jnp.argmax(v, -1)).astype(np.int32) for k, v in logits.items()}
    out["occupied"] = out["occupied"].astype(bool)
    return out


def predict_batched(params: Params, images: np.ndarray, batch: int = 256, config: ClassifierConfig = ClassifierConfig()) -> dict[str, np.ndarray]:
    """`predict` in fixed-size chunks (one compiled shape) for large sets."""
    outs = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        p = predict(params, chunk, config)
        outs.append({k: v[: batch - pad] for k, v in p.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


# ---------------------------------------------------------------------------------------------------
# Training.


def augment(rng: jax.Array, x: jax.Array) -> jax.Array:
    """Blur (random mix with a 3x3 binomial blur), mild per-channel colour jitter, Gaussian noise."""
    b = x.shape[0]
    k_mix, k_blur, k_gain, k_off, k_sig, k_noise = jax.random.split(rng, 6)
    k1 = jnp.array([1.0, 2.0, 1.0]) / 4.0
    kern = (k1[:, None] * k1[None, :])[:, :, None, None] * jnp.eye(3)[None, None]  # [3,3,3,3] HWIO
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = jax.lax.conv_general_dilated(xp, kern, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    use_blur = jax.random.bernoulli(k_blur, 0.5, (b, 1, 1, 1))
    mix = jax.random.uniform(k_mix, (b, 1, 1, 1)) * use_blur
    x = x * (1 - mix) + blurred * mix
    x = x * jax.random.uniform(k_gain, (b, 1, 1, 3), minval=0.92, maxval=1.08)
    x = x + jax.random.uniform(k_off, (b, 1, 1, 3), minval=-0.08, maxval=0.08)
    sigma = jax.random.uniform(k_sig, (b, 1, 1, 1), maxval=0.25)
    return x + sigma * jax.random.normal(k_noise, x.shape)


def loss_fn(logits: dict[str, jax.Array], labels: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy on background and occupancy; colour and shape only on occupied cells."""
    ce = optax.softmax_cross_entropy_with_integer_labels
    occ = labels["occupied"].astype(jnp.float32)
    terms = {
        "background": ce(logits["background"], labels["background"]).mean(),
        "occupied": ce(logits["occupied"], labels["occupied"].astype(jnp.int32)).mean(),
    }
    for k in ("colour", "shape"):
        per = ce(logits[k], jnp.maximum(labels[k], 0))
        terms[k] = (per * occ).sum() / jnp.maximum(occ.sum(), 1.0)
    return sum(terms.values()), terms


def classifier_task(steps: int, batch: int, seed: int, lr: float,
                    config: ClassifierConfig = ClassifierConfig()) -> "trainer.Task":
    """The classifier as a task of the core's trainer spine: its state, loss and step-indexed data."""
    from dediffusion_jax.train import trainer
    model = AttributeClassifier(config)
    tx = trainer.adam(lr, lr * 0.05, min(100, steps // 10), steps)

    def batch_for_step(step: int) -> dict[str, np.ndarray]:
        """TRAIN-split scenes only (held-out scenes never seen); a pure function of (seed, step)."""
        idx = S.sample_indices(np.random.default_rng([seed, step]), batch, "train")
        return {"images": S.images_of(idx), **S.labels_of(idx)}

    def init(key: jax.Array, inputs: Any) -> dict:
        params = model.init(key, jnp.zeros((1, S.IMAGE_SIZE, S.IMAGE_SIZE, 3), jnp.float32))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def step_fn(state: dict, frozen: Any, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        key = jax.random.fold_in(rng, state["step"])
        labels = {k: v for k, v in batch.items() if k != "images"}

        def f(p):
            _, logits = model.apply({"params": p}, augment(key, batch["images"]))
            return loss_fn(logits, labels)

        (loss, terms), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({"step": state["step"] + 1, "params": params, "opt_state": opt_state},
                {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)})

    args = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "config": config.to_dict()}
    return trainer.Task(init=init, step_fn=step_fn, data=trainer.StepIndexedIterator(batch_for_step),
                        example_batch=trainer.example_of(batch_for_step(0)), seed=seed, rng_seed=seed + 1,
                        checkpoint_json=lambda: {"args": args}, config_item="args")


def train_classifier(
    steps: int = 800,
    batch: int = 128,
    seed: int = 0,
    lr: float = 1e-3,
    config: ClassifierConfig = ClassifierConfig(),
    log_every: int = 100,
    workdir: str | Path | None = None,
    stop_after_steps: int = 0,
    allow_changes: tuple[str, ...] = (),
) -> Params | None:
    """Train on TRAIN-split scenes only (held-out scenes never seen) on the trainer spine; prints
    progress. `workdir` keeps checkpoints (a stopped run resumes there exactly); without one the run
    lives in a temporary folder. Returns the params, or None when the run stopped before `steps`.
    A resume with other arguments is refused (the spine's resume guard) unless `allow_changes`
    names them (e.g. ("steps",))."""
    import tempfile

    from dediffusion_jax.train import trainer

    with tempfile.TemporaryDirectory() as tmp:
        task = classifier_task(steps, batch, seed, lr, config)
        run = trainer.Trainer(task, workdir or tmp, trainer.Settings(
            total_steps=steps, log_every=log_every, progress_every=log_every, tensorboard=False,
            stop_after_steps=stop_after_steps, allow_changes=tuple(allow_changes),
            allow_changes_flag="--allow-changes"))
        print(f"classifier: {steps} steps x {batch}, seed {seed}", flush=True)
        summary = run.run()
        if summary["preempted"]:
            return None
        return jax.device_get(run.state["params"])


# ---------------------------------------------------------------------------------------------------
# Saving and loading (safetensors + config.json, like the decoder folders).


def save_classifier(params: Params, out_dir: str | Path, config: ClassifierConfig = ClassifierConfig(), extra: dict | None = None) -> Path:
    from dediffusion_jax import weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep=".")
    weights.save({k: np.asarray(v, np.float32) for k, v in sorted(flat.items())}, out / "model.safetensors")
    cfg = {"model": "AttributeClassifier", **config.to_dict(), "heads": HEADS,
           "labels": {"background": list(S.BACKGROUNDS), "colour": list(S.COLOURS), "shape": list(S.SHAPES)},
           **(extra or {})}  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_classifier(path: str | Path | None = None) -> tuple[Params, ClassifierConfig]:
    """The committed classifier (or one at `path`): (params, config)."""
    from dediffusion_jax import weights

    d = Path(path or DEFAULT_DIR)
    config = ClassifierConfig.from_dict(json.loads((d / "config.json").read_text()))
    flat = weights.read_file(d / "model.safetensors")
    expected = traverse_util.flatten_dict(jax.eval_shape(lambda: init_params(config)), sep=".")
    weights.check_shapes(flat, {k: v.shape for k, v in expected.items()}, d / "model.safetensors")
    params = traverse_util.unflatten_dict({tuple(k.split(".")): jnp.asarray(v) for k, v in flat.items()})
    return params, config


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> None:
    from projects.miniworld import metrics

    p = build_parser()
    a = p.parse_args(argv)
    t0 = time.time()
    params = train_classifier(a.steps, a.batch, a.seed, a.lr, workdir=a.workdir, stop_after_steps=a.stop_after_steps,
                              allow_changes=tuple(k for k in a.allow_changes.split(",") if k))
    wall = time.time() - t0
    if params is None:
        print(f"stopped before step {a.steps}; run again with --workdir {a.workdir} to resume", flush=True)
        return
    acc = metrics.classifier_heldout_accuracy(params, n=512, seed=0)
    print(f"trained in {wall:.0f}s; held-out accuracy (512 real scenes): {json.dumps(acc)}", flush=True)
    extra = {"training": {"steps": a.steps, "batch": a.batch, "seed": a.seed, "lr": a.lr,
                          "wall_time_s": round(wall, 1), "split": "train"},
             "heldout_accuracy_512": acc}  # fmt: skip
    print(save_classifier(params, a.out, extra=extra))


if __name__ == "__main__":
    raise SystemExit(main())
