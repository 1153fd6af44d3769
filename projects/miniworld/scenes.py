"""Procedural scenes of the miniature world (docs/miniworld.md, "The world").

A scene is a 16x16 RGB image: a background colour and 1-2 objects, each in its own 8x8 cell of a 2x2
grid. The world is small enough to enumerate (3,648 distinct scenes), so every image is rendered once,
vectorised, and a training batch is a table look-up: data generation costs nothing next to a train step.

Scenes are indexed 0..3647. Cells are numbered in reading order (0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right); an object "kind" is colour * 3 + shape.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Literal, Sequence

import numpy as np

IMAGE_SIZE = 16
CELL_SIZE = 8
ROWS = ("top", "bottom")
COLS = ("left", "right")
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "gray", "brown")
NUM_CELLS = len(ROWS) * len(COLS)
NUM_KINDS = len(COLOURS) * len(SHAPES)
MAX_OBJECTS = 2
HELD_OUT_PERCENT = 10

# RGB in [0, 1]; object colours and background colours are disjoint so a colour word names its role.
COLOUR_RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.98, 0.88, 0.05),
}
BACKGROUND_RGB = {
    "white": (1.00, 1.00, 1.00),
    "black": (0.00, 0.00, 0.00),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.50, 0.30, 0.12),
}

Split = Literal["train", "heldout", "all"]

# Cell pairs for two-object scenes, in lexicographic (reading) order.
_PAIRS = tuple((a, b) for a in range(NUM_CELLS) for b in range(a + 1, NUM_CELLS))
_N_ONE = NUM_CELLS * NUM_KINDS  # 48 one-object layouts
_N_TWO = len(_PAIRS) * NUM_KINDS * NUM_KINDS  # 864 two-object layouts
_N_LAYOUTS = _N_ONE + _N_TWO  # 912
NUM_SCENES = len(BACKGROUNDS) * _N_LAYOUTS  # 3648


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object: colour, shape and grid cell (row 0 = top, col 0 = left)."""

    colour: str
    shape: str
    row: int
    col: int

    @property
    def cell(self) -> int:
        return self.row * len(COLS) + self.col


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background and its objects, kept in reading order so equal scenes compare equal."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1-{MAX_OBJECTS} objects, got {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError("two objects share a cell")
        for o in self.objects:
            if o.colour not in COLOURS or o.shape not in SHAPES:
                raise ValueError(f"unknown object {o}")
            if not (0 <= o.row < len(ROWS) and 0 <= o.col < len(COLS)):
                raise ValueError(f"object outside the grid: {o}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))

    @property
    def key(self) -> str:
        """Canonical text key (the full caption); the held-out hash is taken over it."""
        parts = [f"{o.colour} {o.shape} {ROWS[o.row]} {COLS[o.col]}" for o in self.objects]
        return " , ".join(parts + [f"{self.background} background"])

    @property
    def index(self) -> int:
        return scene_to_index(self)


def scene_from_index(i: int) -> Scene:
    """The i-th distinct scene (0 <= i < NUM_SCENES), background-major."""
    if not 0 <= i < NUM_SCENES:
        raise IndexError(f"scene index {i} outside [0, {NUM_SCENES})")
    bg, j = divmod(int(i), _N_LAYOUTS)
    if j < _N_ONE:
        cell, kind = divmod(j, NUM_KINDS)
        cells_kinds = [(cell, kind)]
    else:
        p, rest = divmod(j - _N_ONE, NUM_KINDS * NUM_KINDS)
        k1, k2 = divmod(rest, NUM_KINDS)
        cells_kinds = [(_PAIRS[p][0], k1), (_PAIRS[p][1], k2)]
    objects = tuple(
        SceneObject(COLOURS[k // 3], SHAPES[k % 3], c // len(COLS), c % len(COLS))
        for c, k in cells_kinds
    )
    return Scene(BACKGROUNDS[bg], objects)


def scene_to_index(scene: Scene) -> int:
    """Inverse of `scene_from_index`."""
    bg = BACKGROUNDS.index(scene.background)
    kinds = [COLOURS.index(o.colour) * 3 + SHAPES.index(o.shape) for o in scene.objects]
    cells = [o.cell for o in scene.objects]
    if len(cells) == 1:
        j = cells[0] * NUM_KINDS + kinds[0]
    else:
        j = _N_ONE + _PAIRS.index((cells[0], cells[1])) * NUM_KINDS**2 + kinds[0] * NUM_KINDS + kinds[1]
    return bg * _N_LAYOUTS + j


def all_scenes() -> list[Scene]:
    """Every distinct scene, in index order (3,648 of them)."""
    return [scene_from_index(i) for i in range(NUM_SCENES)]


def is_held_out(scene: Scene) -> bool:
    """Held out of every training run, by a stable hash of the description (not of the index)."""
    digest = hashlib.sha256(scene.key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


# ---------------------------------------------------------------------------------------------------
# Tables over all scenes (built once, cached): labels, split masks, sampling weights, images.


@functools.lru_cache(maxsize=None)
def label_table() -> dict[str, np.ndarray]:
    """Per-scene labels as arrays: background [N]; per cell occupied/colour/shape [N, 4] (-1 if empty)."""
    n = NUM_SCENES
    background = np.zeros(n, np.int32)
    colour = np.full((n, NUM_CELLS), -1, np.int32)
    shape = np.full((n, NUM_CELLS), -1, np.int32)
    for i, s in enumerate(all_scenes()):
        background[i] = BACKGROUNDS.index(s.background)
        for o in s.objects:
            colour[i, o.cell] = COLOURS.index(o.colour)
            shape[i, o.cell] = SHAPES.index(o.shape)
    out = {"background": background, "occupied": colour >= 0, "colour": colour, "shape": shape}
    for v in out.values():
        v.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def held_out_mask() -> np.ndarray:
    """Boolean [NUM_SCENES]: True where the scene is held out."""
    m = np.array([is_held_out(s) for s in all_scenes()])
    m.setflags(write=False)
    return m


def split_indices(split: Split) -> np.ndarray:
    """Scene indices of a split ("train", "heldout" or "all")."""
    if split == "all":
        return np.arange(NUM_SCENES)
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    m = held_out_mask()
    return np.flatnonzero(~m if split == "train" else m)


@functools.lru_cache(maxsize=None)
def _split_sampler(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cumulative probabilities of the generative distribution restricted to a split.

    The generative process draws 1 or 2 objects with equal probability, then cells, kinds and the
    background uniformly, so a one-object scene is 18x likelier than a given two-object scene (an
    all-empty prediction then scores 0.62 on occupancy, as in the calibration).
    """
    idx = split_indices(split)
    n_obj = np.where((idx % _N_LAYOUTS) < _N_ONE, 1, 2)
    p = np.where(n_obj == 1, 0.5 / _N_ONE, 0.5 / _N_TWO)
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return idx, cdf


def evaluation_indices(n: int | None = None) -> np.ndarray:
    """The first `n` held-out scenes in a fixed shuffled order (all of them for None).

    The held-out split in index order starts with white and black backgrounds only, so a prefix of it
    is a biased sample; every evaluation (demo, gate, probe) takes a prefix of this order instead.
    """
    order = np.random.default_rng(0).permutation(split_indices("heldout"))
    return order if n is None else order[:n]


def sample_indices(rng: np.random.Generator, batch: int, split: Split = "train") -> np.ndarray:
    """Scene indices drawn from the generative distribution restricted to `split`."""
    idx, cdf = _split_sampler(split)
    return idx[np.searchsorted(cdf, rng.random(batch), side="right")]


# ---------------------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=None)
def shape_masks(supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage masks [3, 8, 8] in [0, 1]: the fraction of each pixel inside the shape."""
    s = supersample
    # Sub-pixel sample centres in cell coordinates (pixel p covers [p, p+1)).
    t = (np.arange(CELL_SIZE * s) + 0.5) / s
    y, x = np.meshgrid(t, t, indexing="ij")
    c, margin = CELL_SIZE / 2, 0.6
    circle = (x - c) ** 2 + (y - c) ** 2 <= (c - margin) ** 2
    square = (np.abs(x - c) <= c - margin - 0.4) & (np.abs(y - c) <= c - margin - 0.4)
    top, bottom, half = margin, CELL_SIZE - margin, c - margin
    frac = (y - top) / (bottom - top)  # 0 at the apex, 1 at the base
    triangle = (frac >= 0) & (frac <= 1) & (np.abs(x - c) <= half * frac)
    hi = np.stack([circle, square, triangle]).astype(np.float32)
    return hi.reshape(len(SHAPES), CELL_SIZE, s, CELL_SIZE, s).mean(axis=(2, 4))


def render_labels(background: np.ndarray, colour: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Vectorised render from label arrays ([B], [B, 4], [B, 4]; -1 = empty) to [B, 16, 16, 3] in [-1, 1]."""
    bg_rgb = np.asarray([BACKGROUND_RGB[b] for b in BACKGROUNDS], np.float32)
    obj_rgb = np.asarray([COLOUR_RGB[c] for c in COLOURS], np.float32)
    masks = shape_masks()
    b = background.shape[0]
    occupied = colour >= 0
    alpha = masks[np.where(occupied, shape, 0)] * occupied[..., None, None]  # [B, 4, 8, 8]
    rgb = obj_rgb[np.where(occupied, colour, 0)]  # [B, 4, 3]
    base = bg_rgb[background][:, None, None, None, :]  # [B, 1, 1, 1, 3]
    cells = base * (1 - alpha[..., None]) + rgb[:, :, None, None, :] * alpha[..., None]  # [B,4,8,8,3]
    img = cells.reshape(b, len(ROWS), len(COLS), CELL_SIZE, CELL_SIZE, 3)
    img = img.transpose(0, 1, 3, 2, 4, 5).reshape(b, IMAGE_SIZE, IMAGE_SIZE, 3)
    return (img * 2.0 - 1.0).astype(np.float32)


@functools.lru_cache(maxsize=None)
def image_table() -> np.ndarray:
    """All 3,648 scene images [N, 16, 16, 3] (11 MB), rendered once."""
    lab = label_table()
    img = render_labels(lab["background"], lab["colour"], lab["shape"])
    img.setflags(write=False)
    return img


def render(scene: Scene) -> np.ndarray:
    """The scene's image [16, 16, 3], float32 in [-1, 1]."""
    lab = label_table()
    i = scene_to_index(scene)
    return render_labels(lab["background"][i : i + 1], lab["colour"][i : i + 1], lab["shape"][i : i + 1])[0]


def images_of(indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """Images of scene indices, [B, 16, 16, 3] (a fresh, writable array)."""
    return image_table()[np.asarray(indices)]


def labels_of(indices: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Label arrays of scene indices (see `label_table`)."""
    idx = np.asarray(indices)
    return {k: v[idx] for k, v in label_table().items()}


def sample_batch(
    rng: np.random.Generator, batch: int, split: Split = "train"
) -> tuple[np.ndarray, list[Scene]]:
    """A batch of images [B, 16, 16, 3] in [-1, 1] and their scenes; deterministic given `rng`."""
    idx = sample_indices(rng, batch, split)
    return images_of(idx), [scene_from_index(int(i)) for i in idx]
