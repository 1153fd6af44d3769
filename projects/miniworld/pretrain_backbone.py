"""Pre-trains the miniature world's image backbone: a CLIP-style dual encoder on (scene, caption) pairs.

Why: the paper's encoder reads a FROZEN, image-text pre-trained backbone (CoCa ViT-L); a randomly
initialised ViT trained end to end is its weakest ablation (FID 14.6 vs 6.43). The world's analogue is
this small CLIP: a ViT image tower (the CLIP vision layout of `models/vit.py`) and a CLIP text tower,
trained contrastively on TRAIN-split scenes and their captions (the held-out 10% stay unseen). It is
exported as a transformers `CLIPModel` folder (config.json + model.safetensors); the world config
loads its image tower through `backbone.init`, exactly as the paper config loads a real CLIP ViT, and
freezes it. De-Diffusion itself still trains on images alone.

    python -m projects.miniworld.pretrain_backbone --out projects/miniworld/assets/backbone

`--width W --layers L` shape the image tower (heads W/32, MLP 4W; default 128 x 3, the committed
backbone): e.g. `--width 64 --layers 2` for a smaller backbone, the world's analogue of the paper's
ViT-B vs ViT-L ablation. The exported config.json records the shape, so `backbone=PATH` loads it as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

DEFAULT_DIR = Path(__file__).with_name("assets") / "backbone"
DEFAULT_WIDTH, DEFAULT_LAYERS = 128, 3  # the committed backbone's image tower
HEAD_DIM = 32  # heads = width / 32: 4 heads at the default width


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.pretrain_backbone",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_DIR))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help=f"image tower hidden size, a multiple of {HEAD_DIM} (heads = width/{HEAD_DIM}, MLP 4x)")
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="image tower depth")
    p.add_argument("--workdir", help="checkpoints of the run (resumed when present); default: a temporary folder")
    p.add_argument("--stop-after-steps", type=int, default=0, help="save and stop after N steps (resume later)")
    p.add_argument("--allow-changes", default="", help="arguments a resume may change, e.g. steps,lr "
                                                       "(any other change is refused)")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)  # before the heavy imports below

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from projects.miniworld import captions, scenes
from projects.miniworld import tokenizer as world_tokenizer
from dediffusion_jax.models import vit
from dediffusion_jax.t2i import clip_text, convert


def world_vision_config(width: int = DEFAULT_WIDTH, layers: int = DEFAULT_LAYERS) -> vit.ViTConfig:
    """The image tower: patch 4 on the 16x16 scene (a 4x4 grid, two patches per cell side) + CLS,
    `width` wide (heads of HEAD_DIM, MLP 4x) and `layers` deep."""
    if width <= 0 or width % HEAD_DIM:
        raise errors.UserError(f"--width {width}: expected a positive multiple of {HEAD_DIM}")
    if layers <= 0:
        raise errors.UserError(f"--layers {layers}: expected a positive depth")
    return vit.ViTConfig(image_size=scenes.IMAGE_SIZE, patch_size=4, hidden_size=width, num_layers=layers,
                         num_heads=width // HEAD_DIM, mlp_dim=4 * width, hidden_act="gelu")


VISION_CONFIG = world_vision_config()  # the default shape (128 wide, 3 deep, 4 heads, MLP 512)
TEXT_CONFIG = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
EMBED_DIM = 64
P_SHUFFLE = 0.5  # captions with their segments in random order: the text tower must bind, not count


class WorldCLIP(nn.Module):
    """Both towers and the learned temperature; returns L2-normalised embeddings and the logit scale."""

    vision_config: vit.ViTConfig
    text_config: clip_text.CLIPTextConfig
    embed_dim: int = EMBED_DIM

    def setup(self) -> None:
        self.vision = vit.ViT(self.vision_config)
        self.text = clip_text.CLIPTextModel(config=self.text_config)
        self.visual_projection = nn.Dense(self.embed_dim, use_bias=False)
        self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

    def embed_images(self, images: jax.Array) -> jax.Array:
        return _l2_normalise(self.visual_projection(self.vision(images).pooler_output))

    def embed_texts(self, ids: jax.Array) -> jax.Array:
        return _l2_normalise(self.text_projection(self.text(input_ids=ids).pooler_output))

    def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(image embeddings, text embeddings, logit scale), clipped at 100 as in CLIP."""
        return self.embed_images(images), self.embed_texts(ids), jnp.exp(jnp.minimum(self.logit_scale, np.log(100.0)))


def _l2_normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(img: jax.Array, txt: jax.Array, scale: jax.Array, scene_ids: jax.Array) -> jax.Array:
    """Symmetric InfoNCE where every pair of the same scene is a positive.

    A batch drawn from the generative distribution repeats one-object scenes often; treating those
    repeats as negatives would teach the towers to tell identical images apart.
    """
    logits = scale * img @ txt.T
    same = (scene_ids[:, None] == scene_ids[None, :]).astype(jnp.float32)
    targets = same / same.sum(axis=1, keepdims=True)
    i2t = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
    t2i = -jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1), axis=1)
    return 0.5 * jnp.mean(i2t + t2i)


@dataclasses.dataclass
class Pretrainer:
    """The model, optimizer and loss of one run as a task of the core's trainer spine (seeded; the
    data of step n is a function of (seed, n), so a stopped run resumes exactly)."""

    steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    seed: int = 0
    vision_config: vit.ViTConfig = VISION_CONFIG

    def __post_init__(self) -> None:
        from dediffusion_jax.train import trainer

        self.tokenizer = world_tokenizer.load_tokenizer()
        self.text_config = clip_text.CLIPTextConfig.from_dict({
            **TEXT_CONFIG, "vocab_size": len(self.tokenizer),
            "max_position_embeddings": int(self.tokenizer.model_max_length),
            "bos_token_id": int(self.tokenizer.bos_token_id), "eos_token_id": int(self.tokenizer.eos_token_id),
            "pad_token_id": int(self.tokenizer.pad_token_id)})
        self.model = WorldCLIP(self.vision_config, self.text_config)
        self.tx = trainer.adam(self.lr, self.lr * 0.02, min(100, self.steps // 10), self.steps,
                               weight_decay=0.01)

    def init(self, key: jax.Array | None = None, inputs: Any = None) -> Any:
        """Fresh params (key(seed) by default)."""
        key = jax.random.key(self.seed) if key is None else key
        ctx = self.text_config.max_position_embeddings
        return self.model.init(key, *vit.dummy_inputs(self.vision_config), jnp.zeros((1, ctx), jnp.int32))["params"]

    def batch_for_step(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        idx = scenes.sample_indices(rng, self.batch, "train")
        texts = []
        for i in idx:
            segs = captions.full_caption(scenes.scene_from_index(int(i))).split(captions.SEGMENT_SEP)
            if rng.random() < P_SHUFFLE:
                segs = [segs[j] for j in rng.permutation(len(segs))]
            texts.append(captions.SEGMENT_SEP.join(segs))
        return scenes.images_of(idx), world_tokenizer.encode(self.tokenizer, texts), idx.astype(np.int32)

    def _batch_dict(self, step: int) -> dict[str, np.ndarray]:
        images, ids, scene_ids = self.batch_for_step(step)
        return {"images": images, "ids": ids, "scene_ids": scene_ids}

    def _init_state(self, key: jax.Array, inputs: Any) -> dict:
        params = self.init(key)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    def _train_step(self, state: dict, frozen: Any, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        def loss_fn(p):
            return contrastive_loss(*self.model.apply({"params": p}, batch["images"], batch["ids"]),
                                    batch["scene_ids"])

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({"step": state["step"] + 1, "params": params, "opt_state": opt_state},
                {"loss": loss, "grad_norm": optax.tree.norm(grads)})

    def task(self) -> Any:
        from dediffusion_jax.train import trainer

        args = {"steps": self.steps, "batch": self.batch, "lr": self.lr, "seed": self.seed}
        if self.vision_config != VISION_CONFIG:  # only then: runs from before --width keep their args
            args.update(width=self.vision_config.hidden_size, layers=self.vision_config.num_layers)
        return trainer.Task(init=self._init_state, step_fn=self._train_step,
                            data=trainer.StepIndexedIterator(self._batch_dict),
                            example_batch=trainer.example_of(self._batch_dict(0)), seed=self.seed,
                            rng_seed=self.seed + 1, checkpoint_json=lambda: {"args": args},
                            config_item="args")

    def train(self, log_every: int = 100, workdir: str | Path | None = None,
              stop_after_steps: int = 0, allow_changes: tuple[str, ...] = ()) -> tuple[Any, list[dict]]:
        """(params, log) of the run on the trainer spine; params is None when it stopped early.
        `workdir` keeps its checkpoints (resumed when present); default: a temporary folder. A
        resume with other arguments is refused unless `allow_changes` names them."""
        import tempfile

        from dediffusion_jax.train import trainer

        print(f"world CLIP: {self.steps} steps x {self.batch}, seed {self.seed}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = trainer.Trainer(self.task(), workdir or tmp, trainer.Settings(
                total_steps=self.steps, log_every=log_every, progress_every=log_every, tensorboard=False,
                stop_after_steps=stop_after_steps, allow_changes=tuple(allow_changes),
                allow_changes_flag="--allow-changes"))
            summary = run.run()
            records = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
        log = [{"step": r["step"], "loss": round(r["loss"], 4)} for r in records if "loss" in r]
        if summary["preempted"]:
            return None, log
        return jax.device_get(run.state["params"]), log


def zero_shot_accuracy(model: WorldCLIP, params: Any, indices: np.ndarray, batch: int = 512) -> float:
    """Fraction of scenes whose image is nearest to its own full caption among ALL 3,648 captions."""
    tokenizer = world_tokenizer.load_tokenizer()
    embed_texts = jax.jit(lambda ids: model.apply({"params": params}, ids, method=WorldCLIP.embed_texts))
    embed_images = jax.jit(lambda x: model.apply({"params": params}, x, method=WorldCLIP.embed_images))
    everything = [captions.full_caption(s) for s in scenes.all_scenes()]
    txt = np.concatenate([np.asarray(embed_texts(jnp.asarray(world_tokenizer.encode(tokenizer, chunk))))
                          for chunk in (everything[i:i + batch] for i in range(0, len(everything), batch))])
    indices = np.asarray(indices)
    img = np.concatenate([np.asarray(embed_images(jnp.asarray(scenes.images_of(indices[i:i + batch]))))
                          for i in range(0, len(indices), batch)])
    return float(np.mean(np.argmax(img @ txt.T, axis=1) == indices))


def clip_model_config(text_config: clip_text.CLIPTextConfig,
                      vision_config: vit.ViTConfig = VISION_CONFIG) -> dict:
    """config.json of the exported folder: a transformers CLIPConfig (CLIPModel)."""
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": EMBED_DIM,
            "logit_scale_init_value": float(np.log(1 / 0.07)),
            "text_config": text_config.to_dict(), "vision_config": vision_config.to_dict()}


WORLD_PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_normalize": True,
                      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                      "size": {"shortest_edge": scenes.IMAGE_SIZE},
                      "crop_size": {"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE}}


def save_world_clip(params: Any, text_config: clip_text.CLIPTextConfig, out: str | Path, info: dict,
                    vision_config: vit.ViTConfig = VISION_CONFIG) -> Path:
    """A transformers CLIPModel folder (config.json + model.safetensors + TRAINING.json).

    Both towers are kept, so the folder is a usable CLIP of the world (and testable as one); the
    De-Diffusion backbone loader (`models.vit.load_clip_vision`) reads only its vision tower.
    `vision_config` is the shape the params were trained with (Pretrainer.vision_config); a mismatch
    is refused here rather than written into a folder that cannot load.
    """
    from dediffusion_jax import weights

    p = jax.device_get(params)
    expected = jax.tree.map(lambda a: tuple(a.shape), vit.abstract_params(vision_config))
    if jax.tree.map(np.shape, p["vision"]) != expected:
        raise ValueError(f"save_world_clip: the vision params do not have the shape of {vision_config} "
                         f"(pass the Pretrainer's vision_config)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = convert.flax_to_torch({
        "vision_model": p["vision"]["vision_model"], "text_model": p["text"]["text_model"],
        "visual_projection": p["visual_projection"], "text_projection": p["text_projection"]})
    state["logit_scale"] = np.asarray(p["logit_scale"], np.float32)
    weights.save({k: np.asarray(v, np.float32) for k, v in sorted(state.items())}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(clip_model_config(text_config, vision_config), indent=2) + "\n")
    # The images it was trained on are the world's, in [-1, 1]: (x/255 - 0.5) / 0.5. Recorded as
    # transformers' CLIPImageProcessor does, so a De-Diffusion run normalises its views the same way.
    (out / vit.PREPROCESSOR_CONFIG).write_text(json.dumps(WORLD_PREPROCESSOR, indent=2) + "\n")
    (out / "TRAINING.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def load_world_clip(folder: str | Path = DEFAULT_DIR) -> tuple[WorldCLIP, Any]:
    """The exported world CLIP as (module, params): both towers, e.g. for zero-shot evaluation."""
    from dediffusion_jax import weights

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = WorldCLIP(vit.ViTConfig.from_dict(config), clip_text.CLIPTextConfig.from_dict(config),
                      int(config["projection_dim"]))
    ctx = model.text_config.max_position_embeddings
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *vit.dummy_inputs(model.vision_config),
                                                 jnp.zeros((1, ctx), jnp.int32)))["params"]
    state = weights.read(folder)
    towers = {"vision_model": abstract["vision"]["vision_model"], "text_model": abstract["text"]["text_model"],
              "visual_projection": abstract["visual_projection"], "text_projection": abstract["text_projection"]}
    loaded = convert.torch_to_flax({k: v for k, v in state.items() if k != "logit_scale"}, towers,
                                   source=str(folder), ignore=(r"(^|\.)position_ids$",))
    params = {"vision": {"vision_model": loaded["vision_model"]}, "text": {"text_model": loaded["text_model"]},
              "visual_projection": loaded["visual_projection"], "text_projection": loaded["text_projection"],
              "logit_scale": np.asarray(state["logit_scale"], np.float32).reshape(())}
    return model, params


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    start = time.time()
    trainer = Pretrainer(args.steps, args.batch, args.lr, args.seed, world_vision_config(args.width, args.layers))
    params, log = trainer.train(workdir=args.workdir, stop_after_steps=args.stop_after_steps,
                                allow_changes=tuple(k for k in args.allow_changes.split(",") if k))
    wall = time.time() - start
    if params is None:
        print(f"stopped before step {args.steps}; run again with --workdir {args.workdir} to resume", flush=True)
        return 0
    acc = {"heldout": zero_shot_accuracy(trainer.model, params, scenes.split_indices("heldout")),
           "train_512": zero_shot_accuracy(trainer.model, params, scenes.split_indices("train")[:512])}
    print(f"zero-shot scene accuracy among all {scenes.NUM_SCENES} captions: {json.dumps(acc)}", flush=True)
    info = {"args": vars(args), "train_wall_seconds": round(wall, 1), "log": log,
            "zero_shot_scene_accuracy": acc, "jax": jax.__version__, "split": "train"}
    out = save_world_clip(params, trainer.text_config, args.out, info, trainer.vision_config)
    print(f"saved {out} ({wall:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
