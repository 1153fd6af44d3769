"""Captions of the miniature world: the full ground truth, a short "human-like" one, the decoder's
pre-training mix, and a word parser for text statistics.

The full caption is comprehensive (every object and the background, in reading order); the short
caption names only the first object's colour and shape, precise but not comprehensive, like a COCO
caption. The question De-Diffusion asks is whether text learned from images alone beats the short one.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from projects.miniworld.scenes import BACKGROUNDS, COLOURS, COLS, ROWS, SHAPES, Scene, SceneObject

SEGMENT_SEP = " , "
BACKGROUND_WORD = "background"
# Every word a caption can contain; the tokenizer makes each one a single token.
WORLD_WORDS = (*COLOURS, *SHAPES, *ROWS, *COLS, *BACKGROUNDS, BACKGROUND_WORD)

# Decoder pre-training mix (docs/miniworld.md, "The decoder").
P_EMPTY, P_FULL, P_SHUFFLED, P_PARTIAL = 0.10, 0.60, 0.10, 0.20
P_KEEP_OBJECT, P_DROP_POSITION, P_KEEP_BACKGROUND = 0.6, 0.3, 0.5


def object_segments(scene: Scene, positions: bool = True) -> list[str]:
    """One segment per object, reading order: 'green circle top left'."""
    out = []
    for o in scene.objects:
        words = [o.colour, o.shape] + ([ROWS[o.row], COLS[o.col]] if positions else [])
        out.append(" ".join(words))
    return out


def background_segment(scene: Scene) -> str:
    return f"{scene.background} {BACKGROUND_WORD}"


def full_caption(scene: Scene) -> str:
    """'green circle top left , yellow circle bottom left , black background'."""
    return SEGMENT_SEP.join(object_segments(scene) + [background_segment(scene)])


def short_caption(scene: Scene) -> str:
    """The first object's colour and shape only: 'green circle'."""
    o = scene.objects[0]
    return f"{o.colour} {o.shape}"


def short_caption_with_background(scene: Scene) -> str:
    """Short caption plus the background phrase: a fairer baseline, since the background is easy."""
    return SEGMENT_SEP.join([short_caption(scene), background_segment(scene)])


def word_soup_caption(scene: Scene, rng: np.random.Generator, fillers: tuple[str, ...] = (),
                      max_words: int = 12, p_filler: float = 0.2) -> str:
    """The scene's caption words drawn with replacement, in random order, some replaced by fillers.

    This is the kind of text De-Diffusion writes (a bag of words with repeats, no grammar). A decoder
    that has only seen grammatical captions punishes such text (the v2 world decoder's loss on "red" x 12
    was 0.0899 vs 0.0570 for empty text), so an encoder exploring words is pushed back to neutral
    filler; soups teach the decoder to read every right word as evidence, whatever the order.
    """
    words = " ".join(object_segments(scene) + [background_segment(scene)]).split()
    n = int(rng.integers(1, max_words + 1))
    picked = [str(w) for w in rng.choice(words, size=n, replace=True)]
    if fillers:
        swap = rng.random(n) < p_filler
        picked = [str(rng.choice(fillers)) if s else w for w, s in zip(picked, swap)]
    return " ".join(picked)


def training_caption(scene: Scene, rng: np.random.Generator, p_soup: float = 0.0,
                     fillers: tuple[str, ...] = ()) -> str:
    """A caption from the decoder pre-training mix: 10% empty, 60% full, 10% shuffled, 20% partial.

    Empty captions train the unconditional branch for guidance; shuffled and partial ones teach the
    decoder to read each segment on its own, so De-Diffusion text need not follow the caption grammar.
    With `p_soup` > 0 that fraction becomes `word_soup_caption` and the non-empty kinds shrink in
    proportion (p_soup = 0 draws exactly the same captions as before the option existed).
    """
    u = rng.random()
    if u < P_EMPTY:
        return ""
    if p_soup:
        if u < P_EMPTY + p_soup:
            return word_soup_caption(scene, rng, fillers)
        u = P_EMPTY + (u - P_EMPTY - p_soup) * (1.0 - P_EMPTY) / (1.0 - P_EMPTY - p_soup)
    if u < P_EMPTY + P_FULL:
        return full_caption(scene)
    if u < P_EMPTY + P_FULL + P_SHUFFLED:
        segs = object_segments(scene) + [background_segment(scene)]
        order = rng.permutation(len(segs))
        return SEGMENT_SEP.join(segs[i] for i in order)
    segs = []
    for o in scene.objects:
        if rng.random() < P_KEEP_OBJECT:
            words = [o.colour, o.shape]
            if rng.random() >= P_DROP_POSITION:
                words += [ROWS[o.row], COLS[o.col]]
            segs.append(" ".join(words))
    if rng.random() < P_KEEP_BACKGROUND:
        segs.append(background_segment(scene))
    return SEGMENT_SEP.join(segs)


# A full caption: 1-2 object segments then the background segment.
_OBJ = rf"(?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)}) (?:{'|'.join(ROWS)}) (?:{'|'.join(COLS)})"
FULL_CAPTION_RE = re.compile(rf"^{_OBJ}(?: , {_OBJ})? , (?:{'|'.join(BACKGROUNDS)}) {BACKGROUND_WORD}$")


@dataclasses.dataclass(frozen=True)
class WordAttributes:
    """Attribute words found in a text, in order of appearance (repeats kept).

    Object colours and background colours are disjoint word sets, so each word has one role even in
    ungrammatical De-Diffusion text.
    """

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    backgrounds: tuple[str, ...]
    other: tuple[str, ...]  # every other word or punctuation token

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dataclasses.asdict(self)


_WORD_RE = re.compile(r"[a-z]+|[^\sa-z]")


def parse_words(text: str) -> WordAttributes:
    """Which attribute words a text contains (lower-cased; punctuation and unknown words in `other`)."""
    groups: dict[str, list[str]] = {k: [] for k in ("colours", "shapes", "rows", "cols", "backgrounds", "other")}
    for w in _WORD_RE.findall(text.lower()):
        if w in COLOURS:
            groups["colours"].append(w)
        elif w in SHAPES:
            groups["shapes"].append(w)
        elif w in ROWS:
            groups["rows"].append(w)
        elif w in COLS:
            groups["cols"].append(w)
        elif w in BACKGROUNDS:
            groups["backgrounds"].append(w)
        else:
            groups["other"].append(w)
    return WordAttributes(**{k: tuple(v) for k, v in groups.items()})


def word_recall_precision(text: str, scene: Scene) -> dict[str, float]:
    """Attribute-word recall/precision of a text against the scene's full caption (multiset match).

    recall: fraction of the ground-truth attribute words (colours, shapes, rows, cols, background) the
    text names; precision: fraction of the text's attribute words that the scene has. Also per group.
    """
    truth, pred = parse_words(full_caption(scene)), parse_words(text)
    out: dict[str, float] = {}
    hit_t = n_t = n_p = 0
    for g in ("colours", "shapes", "rows", "cols", "backgrounds"):
        t, p = list(getattr(truth, g)), list(getattr(pred, g))
        hit = 0
        for w in p:
            if w in t:
                t.remove(w)
                hit += 1
        nt, np_ = len(getattr(truth, g)), len(p)
        out[f"{g}_recall"] = hit / nt if nt else 1.0
        out[f"{g}_precision"] = hit / np_ if np_ else 1.0
        hit_t, n_t, n_p = hit_t + hit, n_t + nt, n_p + np_
    out["recall"] = hit_t / n_t if n_t else 1.0
    out["precision"] = hit_t / n_p if n_p else 1.0
    return out


def parse_full_caption(text: str) -> Scene | None:
    """Inverse of `full_caption` for grammatical captions (None otherwise)."""
    text = " ".join(text.lower().split())
    if not FULL_CAPTION_RE.match(text):
        return None
    *objs, bg = text.split(SEGMENT_SEP)
    objects = []
    for seg in objs:
        c, s, r, k = seg.split()
        objects.append(SceneObject(c, s, ROWS.index(r), COLS.index(k)))
    try:
        return Scene(bg.split()[0], tuple(objects))
    except ValueError:
        return None
