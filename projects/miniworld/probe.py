"""Teacher-forced probe of a world decoder: how much does each kind of text lower its denoising loss?

    python -m projects.miniworld.probe --decoder projects/miniworld/assets/decoder

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

from dediffusion_jax.cli_flags import answer_help_early
from dediffusion_jax import errors

DEFAULT_DECODER = Path(__file__).resolve().parent / "assets" / "decoder"
TEXT_SET_NAMES = ("default", "shapes")
RANK_CONTEXTS = ("random", "colours")
CONTRAST_CAPTION = "red circle top left , white background"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.probe", description=__doc__.splitlines()[0])
    p.add_argument("--decoder", default=str(DEFAULT_DECODER))
    p.add_argument("--workdir", help="a De-Diffusion training run: add its texts as a row (and use its "
                                     "decoder) and print their attribute-word statistics")
    p.add_argument("--scenes", type=int, default=128, help="held-out scenes")
    p.add_argument("--draws", type=int, default=8, help="(t, noise) draws per scene")
    p.add_argument("--timestep", type=int, help="one fixed t for every draw (default: uniform t)")
    p.add_argument("--texts", choices=sorted(TEXT_SET_NAMES), default="default",
                   help="which texts to score: the default set, or 'shapes' (bags of words with and "
                        "without shape and row words)")
    p.add_argument("--st-ranks", action="store_true",
                   help="instead: where the straight-through gradient ranks the right words (straight_through_ranks)")
    p.add_argument("--context", choices=RANK_CONTEXTS, default="random",
                   help="--st-ranks: the text the gradient is taken at")
    p.add_argument("--per-word", action="store_true",
                   help="--st-ranks: also every word's mean rank, most favoured first")
    p.add_argument("--t-range", type=int, nargs=2, metavar=("LO", "HI"),
                   help="--st-ranks: draw t from [LO, HI) (default: the upper half)")
    p.add_argument("--slot-mass", action="store_true",
                   help="with --workdir, instead: the probability mass its encoder puts on each kind "
                        "of the scene's words (slot_word_mass)")
    p.add_argument("--contrast", action="store_true",
                   help=f"instead: how much the text states move per word swap in {CONTRAST_CAPTION!r}")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)  # before the heavy imports below

import jax
import jax.numpy as jnp
import numpy as np

from projects.miniworld import captions, scenes
from dediffusion_jax.t2i import pipeline, schedules
from dediffusion_jax.t2i.folder import LoadedDecoder, load_decoder

TextsFn = Callable[[scenes.Scene], str]
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


def probe(decoder: LoadedDecoder, indices: Sequence[int], texts: dict[str, TextsFn] | None = None,
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


def _wrong_shape(o: scenes.SceneObject) -> str:
    return scenes.SHAPES[(scenes.SHAPES.index(o.shape) + 1) % len(scenes.SHAPES)]


def _object_words(words: Callable[[scenes.SceneObject], list[str]]) -> TextsFn:
    return lambda s: " ".join([w for o in s.objects for w in words(o)] + [s.background])


# Which words pay off WITHOUT the caption's grammar or positions, as an encoder's bag of words would
# have them: does a shape word help when the decoder does not know where the object is?
SHAPE_TEXTS: dict[str, TextsFn] = {
    "colours + background": _object_words(lambda o: [o.colour]),
    "colour shape + background": _object_words(lambda o: [o.colour, o.shape]),
    "colour WRONG shape + background": _object_words(lambda o: [o.colour, _wrong_shape(o)]),
    "colour row + background": _object_words(lambda o: [o.colour, scenes.ROWS[o.row]]),
    "colour shape row + background": _object_words(lambda o: [o.colour, o.shape, scenes.ROWS[o.row]]),
    "full caption": captions.full_caption,
}
TEXT_SETS = dict(zip(TEXT_SET_NAMES, (PROBE_TEXTS, SHAPE_TEXTS)))

CONTRAST_PAIRS = (("left", "right"), ("top", "bottom"), ("red", "blue"), ("circle", "square"))


def state_contrast(decoder: LoadedDecoder, caption: str, a: str, b: str) -> np.ndarray:
    """Per position, how far the text encoder's output moves when word `a` of `caption` becomes `b`
    (L2 distance / mean state norm): a word whose own position barely moves is one the UNet cannot read.
    """
    if a not in caption.split():
        raise ValueError(f"{a!r} is not a word of {caption!r}")
    swapped = " ".join(b if w == a else w for w in caption.split())
    ids = jnp.asarray(pipeline.tokenize(decoder, [caption, swapped]))
    h = np.asarray(pipeline.text_states(decoder, decoder.params, ids))
    return np.linalg.norm(h[0] - h[1], axis=-1) / np.linalg.norm(h[0], axis=-1).mean()


def _context_words(scene: scenes.Scene, num_tokens: int) -> list[str]:
    """The 'colours' context: the background word and the object colours, repeated to fill the slots,
    like the texts a young soft-Gumbel encoder writes ('white blue white blue ...')."""
    words = [scene.background] + [o.colour for o in scene.objects]
    return [words[k % len(words)] for k in range(num_tokens)]


def straight_through_ranks(decoder: LoadedDecoder, indices: Sequence[int], num_tokens: int = 12, draws: int = 8,
                           seed: int = 0, context: str = "random",
                           timesteps: tuple[int, int] | None = None,
                           per_word: bool = False) -> dict[str, float]:
    """Does the gradient an encoder receives through the token embeddings point at the right words?

    For each scene, a text of `num_tokens` words goes through the decoder's text encoder as token
    embeddings: random words of the encoder's vocabulary (world words and distractors; `context=
    "random"`, where training starts) or the scene's background and object colours repeated
    (`"colours"`, where a soft-Gumbel encoder is after a few hundred steps). Word v in slot k is scored
    by <dL/de_k, E[v]> (the first-order change of the denoising loss if slot k moved toward v: the
    straight-through estimator's signal, and the soft relaxation's at a one-hot point), with t drawn
    from `timesteps` = [lo, hi) (default: the upper half). Returns the mean rank (0 = most favoured) of
    the scene's background word, its object colours and shapes, the shapes and colours it does not
    have; an uninformative gradient ranks them all at (vocabulary - 1) / 2. `per_word` adds each
    word's mean rank over all scenes as "word WORD".
    """
    if context not in RANK_CONTEXTS:
        raise ValueError(f"context={context!r}; choose one of {RANK_CONTEXTS}")
    from projects.miniworld import tokenizer as world_tokenizer
    from dediffusion_jax.t2i import clip_text

    tok = decoder.tokenizer
    vocab = list(captions.WORLD_WORDS + world_tokenizer.DISTRACTORS)
    word_ids = np.asarray([tok.convert_tokens_to_ids(f"{w}</w>") for w in vocab])
    rng = np.random.default_rng(seed)
    images = jnp.asarray(scenes.images_of(np.asarray(indices)))
    b = images.shape[0]
    if context == "random":
        body = word_ids[rng.integers(0, len(vocab), (b, num_tokens))]
    else:
        body = np.asarray([[word_ids[vocab.index(w)] for w in _context_words(scenes.scene_from_index(int(i)),
                                                                               num_tokens)] for i in indices])
    bos, eos = int(tok.bos_token_id), int(tok.eos_token_id)
    ctx = int(tok.model_max_length)
    ids = np.full((b, ctx), int(tok.pad_token_id), np.int64)
    ids[:, 0], ids[:, 1:num_tokens + 1], ids[:, num_tokens + 1] = bos, body, eos
    table = clip_text.token_embedding_matrix(decoder.params["text_encoder"])
    schedule = decoder.schedule

    lo, hi = timesteps or (schedule.num_train_timesteps // 2, schedule.num_train_timesteps)
    if not 0 <= lo < hi <= schedule.num_train_timesteps:
        raise ValueError(f"timesteps {timesteps} outside [0, {schedule.num_train_timesteps}]")

    def loss(embeds: jax.Array, key: jax.Array) -> jax.Array:
        k_t, k_noise = jax.random.split(key)
        t = jax.random.randint(k_t, (b,), lo, hi)
        noise = jax.random.normal(k_noise, images.shape)
        x_t = schedules.add_noise(schedule, images, noise, t)
        states = decoder.text_encoder.apply({"params": decoder.params["text_encoder"]}, token_embeds=embeds,
                                            eos_positions=jnp.full((b,), num_tokens + 1)).last_hidden_state
        pred = decoder.unet.apply({"params": decoder.params["unet"]}, x_t, t, states)
        return jnp.sum(jnp.mean(jnp.square(pred - schedules.training_target(schedule, images, noise, t)),
                                axis=(1, 2, 3)))

    grad = jax.jit(jax.grad(loss))
    embeds = table[jnp.asarray(ids)]
    g = np.mean([np.asarray(grad(embeds, jax.random.key(seed + k))) for k in range(draws)], axis=0)
    scores = g[:, 1:num_tokens + 1] @ np.asarray(table)[word_ids].T  # [B, N, words]; low = favoured
    rank = np.argsort(np.argsort(scores, axis=-1), axis=-1).mean(axis=1)  # [B, words], mean over slots
    col = {w: i for i, w in enumerate(vocab)}
    out: dict[str, list[float]] = {"background": [], "colour": [], "shape": [], "absent colour": [],
                                   "absent shape": []}
    for r, i in zip(rank, indices):
        scene = scenes.scene_from_index(int(i))
        present = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        out["background"].append(r[col[scene.background]])
        out["colour"] += [r[col[c]] for c in present]
        out["shape"] += [r[col[o.shape]] for o in scene.objects]
        out["absent colour"] += [r[col[c]] for c in scenes.COLOURS if c not in present]
        out["absent shape"] += [r[col[x]] for x in scenes.SHAPES if x not in shapes]
    words = {f"word {w}": float(rank[:, j].mean()) for j, w in enumerate(vocab)} if per_word else {}
    return {k: float(np.mean(v)) for k, v in out.items()} | words | {"chance": (len(vocab) - 1) / 2}


def slot_word_mass(workdir: str | Path, indices: Sequence[int]) -> dict[str, float]:
    """How much of a trained encoder's word distribution (softmax of its logits, per slot, averaged
    over slots and scenes) falls on each kind of word of the scene: its background, its object
    colours and shapes, and shapes it does not have.

    Why: with the soft relaxation the encoder trains through Gumbel samples of this distribution,
    but the text is its per-slot argmax; a kind of word can carry real mass in training and still
    never be the argmax (docs/miniworld.md, "Why shape words stay out of the argmax text").
    Also returns "shape, best slot": the mass on the scene's shapes in the slot that has the most.
    """
    from dediffusion_jax.inference import TextEncoder

    enc = TextEncoder.from_checkpoint(Path(workdir))
    logits = np.asarray(jax.jit(enc.model.logits)(enc.trainable, enc.frozen,
                                                  scenes.images_of(np.asarray(indices))))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [B, N, V]; excluded words have -inf logits -> 0
    tok = enc.decoder.tokenizer

    def ids(words: Sequence[str]) -> list[int]:
        return [int(tok.convert_tokens_to_ids(f"{w}</w>")) for w in words]

    out: dict[str, list[float]] = {"background": [], "colour": [], "shape": [], "absent shape": [],
                                   "shape, best slot": []}
    for p, i in zip(probs, indices):
        scene = scenes.scene_from_index(int(i))
        shapes = sorted({o.shape for o in scene.objects})
        out["background"].append(p[:, ids([scene.background])].sum(-1).mean())
        out["colour"].append(p[:, ids(sorted({o.colour for o in scene.objects}))].sum(-1).mean())
        out["shape"].append(p[:, ids(shapes)].sum(-1).mean())
        out["absent shape"].append(p[:, ids([x for x in scenes.SHAPES if x not in shapes])].sum(-1).mean())
        out["shape, best slot"].append(p[:, ids(shapes)].sum(-1).max())
    return {k: float(np.mean(v)) for k, v in out.items()}


def de_diffusion_texts(workdir: str | Path, indices: Sequence[int]) -> tuple[LoadedDecoder, dict[scenes.Scene, str]]:
    """A trained De-Diffusion run's decoder and its texts (argmax tokens) for the scenes `indices`."""
    from dediffusion_jax.inference import TextEncoder

    enc = TextEncoder.from_checkpoint(Path(workdir), batch_size=len(indices))
    texts = enc.texts(scenes.images_of(np.asarray(indices)))
    return enc.decoder, dict(zip((scenes.scene_from_index(int(i)) for i in indices), texts))


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    indices = scenes.evaluation_indices(args.scenes)
    if args.st_ranks:
        ranks = straight_through_ranks(load_decoder(args.decoder), indices, draws=args.draws,
                                       context=args.context,
                                       timesteps=tuple(args.t_range) if args.t_range else None,
                                       per_word=args.per_word)
        words = sorted(((k[5:], ranks.pop(k)) for k in list(ranks) if k.startswith("word ")),
                       key=lambda kv: kv[1])
        print(f"straight-through mean rank (0 = most favoured, chance {ranks.pop('chance'):.1f}) on "
              f"{len(indices)} held-out scenes, {args.draws} draws, {args.context} context"
              + (f", t in [{args.t_range[0]}, {args.t_range[1]})" if args.t_range else "") + ": "
              + ", ".join(f"{k} {v:.2f}" for k, v in ranks.items()))
        if words:
            print("per word, most favoured first: " + ", ".join(f"{w} {r:.1f}" for w, r in words))
        return 0
    if args.slot_mass:
        if not args.workdir:
            p.error("--slot-mass needs --workdir (a trained De-Diffusion run)")
        mass = slot_word_mass(args.workdir, indices)
        print(f"mean probability mass per slot of {args.workdir}'s encoder on {len(indices)} held-out "
              "scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in mass.items()))
        return 0
    if args.contrast:
        decoder = load_decoder(args.decoder)
        words = CONTRAST_CAPTION.split()
        print(f"text-state change per position (L2 / mean norm) of {args.decoder}, caption {CONTRAST_CAPTION!r}")
        print("| swap | " + " | ".join(["<sos>", *words, "<eos>"]) + " |\n|---|" + "---|" * (len(words) + 2))
        for a, b in CONTRAST_PAIRS:
            d = state_contrast(decoder, CONTRAST_CAPTION, a, b)[: len(words) + 2]
            print(f"| {a} -> {b} | " + " | ".join(f"{x:.3f}" for x in d) + " |")
        return 0
    texts = dict(TEXT_SETS[args.texts])
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
        from projects.miniworld.evaluator import text_statistics

        stats = text_statistics(list(by_scene.values()), indices)
        print(f"\nDe-Diffusion text: {len(set(by_scene.values()))} distinct of {len(indices)}; attribute-word "
              "recall: " + ", ".join(f"{k.replace('_recall', '')} {v:.2f}" for k, v in stats.items()
                                     if k.endswith("recall")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
