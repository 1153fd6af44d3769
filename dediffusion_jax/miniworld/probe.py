"""Teacher-forced probe of a world decoder: how much does each kind of text lower its denoising loss?

    python -m dediffusion_jax.miniworld.probe --decoder dediffusion_jax/miniworld/assets/decoder

For held-out scenes it reports the decoder's own training loss (v-MSE over random t and noise) given
several texts: empty, constant texts, the background word, the short and full captions. It answers,
without sampling, what the De-Diffusion encoder can gain by writing each kind of word (the landscape it
is trained on), and whether the decoder reads object words at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax.miniworld import captions, scenes
from dediffusion_jax.t2i import pipeline, schedules
from dediffusion_jax.t2i.folder import Decoder, load_decoder

TextsFn = Callable[[scenes.Scene], str]
DEFAULT_DECODER = Path(__file__).resolve().parent / "assets" / "decoder"


def _bg_word(s: scenes.Scene) -> str:
    return captions.background_segment(s).split()[0]


def _swapped(a: str, b: str) -> TextsFn:
    """The full caption with words a and b exchanged: does the decoder read that distinction?"""

    def fn(s: scenes.Scene) -> str:
        return " ".join(b if w == a else a if w == b else w for w in captions.full_caption(s).split())

    return fn


def _sorted_words(s: scenes.Scene) -> str:
    """The full caption's words (no commas) in alphabetical order: a bag of the right words."""
    return " ".join(sorted(w for w in captions.full_caption(s).split() if w != ","))


PROBE_TEXTS: dict[str, TextsFn] = {
    "empty": lambda s: "",
    '"right" x 12': lambda s: " ".join(["right"] * 12),
    '"red" x 12': lambda s: " ".join(["red"] * 12),
    "background colour word": _bg_word,
    "background phrase": captions.background_segment,
    "short caption": captions.short_caption,
    "short + background": lambda s: f"{captions.short_caption(s)}{captions.SEGMENT_SEP}{captions.background_segment(s)}",
    "full caption": captions.full_caption,
    # Equal to the full caption's loss = the decoder ignores that pair of position words.
    "full, top/bottom swapped": _swapped("top", "bottom"),
    "full, left/right swapped": _swapped("left", "right"),
    # A bag of the right words without the caption's order: can the decoder read De-Diffusion-like text?
    "full caption's words, sorted": _sorted_words,
}


def probe(decoder: Decoder, indices: Sequence[int], texts: dict[str, TextsFn] | None = None,
          draws: int = 8, seed: int = 0, timestep: int | None = None) -> dict[str, float]:
    """Mean denoising loss per text kind over `draws` (t, noise) samples of the scenes `indices`.

    With `timestep`, every draw uses that t (the noise draws stay the same): where does text matter?
    """
    texts = texts or PROBE_TEXTS
    images = jnp.asarray(scenes.images_of(np.asarray(indices)))
    scene_list = [scenes.scene_from_index(int(i)) for i in indices]
    schedule = decoder.schedule

    @jax.jit
    def loss(states: jax.Array, key: jax.Array) -> jax.Array:
        k_t, k_noise = jax.random.split(key)
        t = jax.random.randint(k_t, (images.shape[0],), 0, schedule.num_train_timesteps)
        if timestep is not None:
            t = jnp.full_like(t, timestep)
        noise = jax.random.normal(k_noise, images.shape)
        x_t = schedules.add_noise(schedule, images, noise, t)
        pred = decoder.unet.apply({"params": decoder.params["unet"]}, x_t, t, states)
        return jnp.mean(jnp.square(pred - schedules.training_target(schedule, images, noise, t)))

    out = {}
    for name, fn in texts.items():
        ids = jnp.asarray(pipeline.tokenize(decoder, [fn(s) for s in scene_list]))
        states = pipeline.text_states(decoder, decoder.params, ids)
        # The same (t, noise) draws for every text: differences are the text's alone.
        out[name] = float(np.mean([loss(states, jax.random.key(seed + k)) for k in range(draws)]))
    return out


def de_diffusion_texts(workdir: str | Path, indices: Sequence[int]) -> tuple[Decoder, dict[scenes.Scene, str]]:
    """A trained De-Diffusion run's decoder and its texts (argmax tokens) for the scenes `indices`."""
    from dediffusion_jax.train import checkpoint

    _, model, trainable, frozen = checkpoint.load_for_inference(Path(workdir))
    token_ids = jax.jit(model.token_ids)(trainable, frozen, scenes.images_of(np.asarray(indices)))
    texts = model.texts(np.asarray(token_ids))
    return model.decoder, dict(zip((scenes.scene_from_index(int(i)) for i in indices), texts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dediffusion_jax.miniworld.probe", description=__doc__.splitlines()[0])
    p.add_argument("--decoder", default=str(DEFAULT_DECODER))
    p.add_argument("--workdir", help="a De-Diffusion training run: add its texts as a row (and use its "
                                     "decoder) and print their attribute-word statistics")
    p.add_argument("--scenes", type=int, default=128, help="held-out scenes")
    p.add_argument("--draws", type=int, default=8, help="(t, noise) draws per scene")
    p.add_argument("--timestep", type=int, help="one fixed t for every draw (default: uniform t)")
    args = p.parse_args(argv)
    indices = scenes.evaluation_indices(args.scenes)
    texts = dict(PROBE_TEXTS)
    if args.workdir:
        decoder, by_scene = de_diffusion_texts(args.workdir, indices)
        texts["De-Diffusion text"] = by_scene.__getitem__
        source = f"{args.workdir}'s decoder"
    else:
        decoder, source = load_decoder(args.decoder), args.decoder
    if args.timestep is not None and not 0 <= args.timestep < decoder.schedule.num_train_timesteps:
        p.error(f"--timestep must be in [0, {decoder.schedule.num_train_timesteps})")
    result = probe(decoder, indices, texts, draws=args.draws, timestep=args.timestep)
    at = "uniform t" if args.timestep is None else f"t = {args.timestep}"
    print(f"teacher-forced v-MSE of {source} on {len(indices)} held-out scenes x {args.draws} draws, {at}")
    print("| text | v-MSE |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value:.4f} |")
    if args.workdir:
        from dediffusion_jax.miniworld.evaluate_world import text_statistics

        stats = text_statistics(list(by_scene.values()), indices)
        print(f"\nDe-Diffusion text: {len(set(by_scene.values()))} distinct of {len(indices)}; attribute-word "
              "recall: " + ", ".join(f"{k.replace('_recall', '')} {v:.2f}" for k, v in stats.items()
                                     if k.endswith("recall")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
