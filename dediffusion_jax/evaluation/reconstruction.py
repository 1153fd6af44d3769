"""The paper's reconstruction-FID protocol as a resumable Python API.

image -> text (De-Diffusion, captions, any captioner) -> a third-party text-to-image model (DDIM,
a sweep of classifier-free guidance scales) -> images resized to `resolution` -> FID against the
source images (centre-cropped and resized the same way), one FID per (text source, guidance);
beside it the unbiased KID (`evaluation/kid.py`) of the same features and, optionally, the CLIP
score of each generated image against its own text (`evaluation/clip_score.py`).

The resize (the paper's 256x256): PIL bicubic, antialiased, to uint8, as clean-fid's "clean" mode
advocates (not torch's aliasing bilinear). A generated image is resized whole
(`Image.resize((R, R), BICUBIC)`; a non-square one, which SD never draws, is centre-cropped like a
source image); a source image is decoded, and its centred square of side min(H, W) resized by the
one PIL call `Image.resize((R, R), BICUBIC, box=centre_square)`. That is the centre crop followed by
the resize, except that PIL's bicubic taps at the square's two cut edges read the real neighbouring
pixels instead of repeating the edge (and an odd margin is split exactly, by half a pixel): the
two differ only on the outermost output columns (or rows) (tests/test_reconstruction_resize.py).
An image already RxR is used as it is. A JPEG whose shorter side is at least 2R decodes at a
reduced DCT scale first (`decode_image(min_side=R)`; COCO's 640x480 never does at R = 256).
The FID network then resizes to its own input (299 for Inception, with pytorch-fid's bilinear,
`evaluation/inception.py`).

Work is cut into units (text source, guidance, image shard). Each finished unit is one .npz of
features (plus PNG previews of the first `grid_rows` images) written atomically, so an
interrupted run resumes where it stopped: a rerun with the same settings skips every finished unit
and only decodes the image shards that still have work. New text sources or guidance scales can be added to a finished
workdir; changing anything that would change finished units (source, image count, shard size,
seed, resolution, extractor, text-to-image model) is refused with the differences named.

Layout of `workdir`:
    protocol.json                               settings every unit depends on
    reference/shard_00000.json                  image ids of the shard and the images skipped
    reference/features_00000.npz                source-image features (not needed once cached)
    reference/previews/00000_000.png            originals for the grids (shard, position)
    reference_cache/ref_<hash>.npz              FeatureStats of all source images (the cache,
                                                keyed by source + count + resolution + extractor)
    reference_cache/features/ref_<hash>.npz     {ids, features} of all source images (for KID;
                                                caches written before KID lack it)
    sources/<slug>/source.json                  {name, key}
    sources/<slug>/texts_00000.jsonl            the texts given to the model
    sources/<slug>/g3.0/shard_00000.npz         {ids, features, [clip_cos, clip_model]} of the
                                                generated images
    sources/<slug>/g3.0/previews/00000_000.png  the same images, generated
    results.json  results.md  grid.png  grid_g3.0.png ...

Noise: every unit of shard k uses the pipeline seed `shard_seed(seed, k)`, so all text sources and
guidance scales see the same initial noise for the same image (common random numbers), and a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dediffusion_jax.data.preprocess import CorruptExampleError, decode_image
from dediffusion_jax.evaluation.fid import FeatureExtractor, FeatureStats, fid_from_stats
from dediffusion_jax.evaluation.kid import (KID_NUM_SUBSETS, KID_SUBSET_SIZE,
                                            kernel_inception_distance)
from dediffusion_jax.evaluation.text_sources import TextSource

PAPER_GUIDANCE_SCALES: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
PAPER_NUM_STEPS = 50
PAPER_RESOLUTION = 256
PAPER_NUM_IMAGES = 30_000

# (prompts, guidance_scale, seed) -> uint8 images [B, H, W, 3]; deterministic per (seed, index).
GenerateFn = Callable[[list[str], float, int], np.ndarray]
# (generated uint8 images [B, R, R, 3], the shard's source records) -> {metric: (hits [B], counts [B])}:
# per-image counts, so a metric pooled over shards is sum(hits) / sum(counts), whatever the sharding
# (e.g. colour accuracy over the objects of each image, 1 or 2 per image).
ImageScorer = Callable[[np.ndarray, list[dict]], dict[str, tuple[np.ndarray, np.ndarray]]]


class TextImageScorer(Protocol):
    """What the protocol needs of a CLIP scorer (`clip_score.ClipScorer`): a `name` recorded in
    every unit, and per-pair cosines of generated images and the texts they were drawn from."""

    name: str

    def cosines(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray: ...


class ProtocolStopped(RuntimeError):
    """Raised after `max_shards` units were computed in this call; rerun to continue."""

    def __init__(self, done: int, remaining: int):
        super().__init__(f"stopped after {done} new unit(s); {remaining} left; rerun to resume")
        self.done, self.remaining = done, remaining


# ------------------------------------------------------------------------------- text-to-image


def flax_generate_fn(decoder: Any, num_steps: int, *, batch_size: int = 16, mesh: Any = None,
                     eta: float = 0.0) -> GenerateFn:
    """Our Flax pipeline (`t2i.pipeline.generate`), sharded over the mesh's 'data' axis."""
    from dediffusion_jax.t2i import pipeline

    def generate(prompts: list[str], guidance_scale: float, seed: int) -> np.ndarray:
        return pipeline.generate(decoder, prompts, num_steps=num_steps,
                                 guidance_scale=guidance_scale, seed=seed, eta=eta,
                                 batch_size=batch_size, mesh=mesh)

    return generate


def torch_generate_fn(folder: str | os.PathLike, num_steps: int, *, batch_size: int = 8,
                      device: str | None = None) -> GenerateFn:
    """diffusers' PyTorch StableDiffusionPipeline with a DDIM scheduler (latent SD folders only).

    Each image gets its own torch.Generator seeded from (seed, index), so images do not depend on
    batching. No safety checker (it would blank images and bias the FID).
    """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = StableDiffusionPipeline.from_pretrained(
        os.fspath(folder), safety_checker=None, requires_safety_checker=False,
        use_safetensors=True, low_cpu_mem_usage=False,  # (without accelerate it warns)
        # float16 weights (SD "fp16" folders, the world's) compute in float32, as our loader does
        dtype=torch.float32).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts: list[str], guidance_scale: float, seed: int) -> np.ndarray:
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            gens = [torch.Generator("cpu").manual_seed(seed * 1_000_003 + start + i)
                    for i in range(len(chunk))]
            with torch.no_grad():
                images = pipe(chunk, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                              generator=gens, output_type="np").images
            out.append(np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8))
        return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)

    return generate


def shard_seed(seed: int, shard: int) -> int:
    return (int(seed) * 1_000_003 + int(shard)) % (2**31 - 1)


# ------------------------------------------------------------------------------------ images


def reference_image(data: Any, resolution: int) -> np.ndarray:
    """Encoded image -> uint8 [R, R, 3]: centre square, bicubic resize.

    Raises CorruptExampleError for an undecodable image.
    """
    im = decode_image(data, min_side=resolution)
    w, h = im.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box),
                      np.uint8)


def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [B, H, W, 3] generated images -> [B, R, R, 3] (centre square, bicubic)."""
    images = np.asarray(images)
    if images.shape[1:3] == (resolution, resolution):
        return images.astype(np.uint8)
    out = []
    for x in images:
        im = Image.fromarray(x.astype(np.uint8))
        w, h = im.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        out.append(np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC,
                                        box=box)))
    return np.stack(out).astype(np.uint8)


def guidance_label(g: float) -> str:
    """1.5 -> '1.5', 2 -> '2.0' (as the paper's table writes them)."""
    return f"{g:.1f}" if round(g, 1) == g else f"{g:g}"


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return s or "source"


# ---------------------------------------------------------------------------------- file helpers


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_savez(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _load_features(path: Path) -> tuple[list[str], np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [str(i) for i in data["ids"].tolist()], np.asarray(data["features"])


def _save_previews(folder: Path, images: np.ndarray, shard: int) -> None:
    if len(images) == 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x).save(folder / f"{shard:05d}_{i:03d}.png")


def _read_previews(folder: Path, n: int) -> list[np.ndarray]:
    paths = sorted(folder.glob("*_*.png"))[:n] if folder.is_dir() else []
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


# -------------------------------------------------------------------------------- the protocol


def run_protocol(
    source: Any,
    text_sources: Sequence[TextSource],
    decoder: Any,
    guidance_scales: Sequence[float],
    num_steps: int,
    extractor: FeatureExtractor,
    workdir: str | os.PathLike,
    *,
    num_images: int | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    mesh: Any = None,
    resolution: int = PAPER_RESOLUTION,
    generate_fn: GenerateFn | None = None,
    generator_key: str | None = None,
    source_key: str | None = None,
    reference_cache_dir: str | os.PathLike | None = None,
    extract_batch_size: int = 64,
    grid_rows: int = 8,
    max_shards: int | None = None,
    on_shard_done: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    scorer: ImageScorer | None = None,
    scorer_key: str | None = None,
    kid_subsets: int = KID_NUM_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_seed: int = 0,
    clip: str | os.PathLike | TextImageScorer | None = None,
    clip_tokenizer: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) the reconstruction-FID protocol; returns the results (= results.json).

    Args:
      source: an image source (`len`, `source[i] -> {'id', 'image', 'captions'?}`); the first
        `num_images` (default all) are used, undecodable ones skipped and listed.
      text_sources: `TextSource`s (see `evaluation.text_sources`); names must be distinct.
      decoder: a `t2i.folder.LoadedDecoder` run by the Flax pipeline, or None when `generate_fn` is given.
      guidance_scales, num_steps: the sweep (the paper: PAPER_GUIDANCE_SCALES, 50 DDIM steps).
      extractor: a `fid.FeatureExtractor` (InceptionV3 for the standard FID; any network for
        miniature experiments); it gets uint8 [B, R, R, 3] batches.
      workdir: where units, previews and results go; rerunning resumes.
      generate_fn / generator_key: a custom text-to-image function (e.g. `torch_generate_fn`) and a
        string naming it (recorded; a resume with another model is refused).
      source_key: names the image source for the reference-stats cache (default: repr(source)).
      reference_cache_dir: where reference FeatureStats are cached (WORKDIR/reference_cache).
      max_shards: compute at most this many new units, then raise ProtocolStopped.
      on_shard_done: called with {'source', 'guidance', 'shard', 'path'} after each new unit.
      scorer / scorer_key: an optional `ImageScorer` that rates each generated image against its
        source record (e.g. an attribute classifier), and a string naming it (recorded like the
        extractor); each row of the results then has `scores[guidance][metric]`.
      kid_subsets / kid_subset_size / kid_seed: the KID estimator's subsets (clean-fid's and
        torch-fidelity's 100 x 1000 by default); they change no unit, only the results.
      clip / clip_tokenizer: a transformers CLIPModel folder (and its tokenizer's folder when it
        keeps none), or a ready `TextImageScorer`: each row then has `clip_score[guidance]`.
        Finished units without CLIP cosines of this model are generated again.
    """
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    guidance_scales = [float(g) for g in guidance_scales]
    if not guidance_scales:
        raise ValueError("give at least one guidance scale")
    if kid_subsets < 1 or kid_subset_size < 2:
        raise ValueError(f"KID needs kid_subsets >= 1 and kid_subset_size >= 2, got {kid_subsets} "
                         f"and {kid_subset_size}")
    if clip is not None and not hasattr(clip, "cosines"):
        from dediffusion_jax.evaluation.clip_score import ClipScorer

        clip = ClipScorer(clip, clip_tokenizer)
    clip_key = None if clip is None else str(clip.name)
    names = [t.name for t in text_sources]
    if not names or len(set(map(slug, names))) != len(names):
        raise ValueError(f"text sources need distinct names, got {names}")
    if generate_fn is None:
        if decoder is None:
            raise ValueError("give a decoder or a generate_fn")
        generate_fn = flax_generate_fn(decoder, num_steps, batch_size=batch_size, mesh=mesh)
        generator_key = generator_key or (
            f"flax:{decoder.identity}:steps={num_steps}")  # weights, not their folder's path
    generator_key = generator_key or "custom"
    total = len(source) if num_images is None else min(int(num_images), len(source))
    if total < 1:
        raise ValueError("the image source is empty")
    num_shards = math.ceil(total / shard_size)
    source_key = source_key or repr(source)
    log = _Log(progress)

    settings = {
        "source": source_key, "num_images": total, "shard_size": int(shard_size),
        "seed": int(seed), "resolution": int(resolution), "extractor": extractor.name,
        "generator": generator_key, "num_steps": int(num_steps),
    }
    if scorer is not None:
        settings["scorer"] = scorer_key or getattr(scorer, "name", "custom")
    _check_settings(workdir / "protocol.json", settings)
    slugs = {t.name: slug(t.name) for t in text_sources}
    for t in text_sources:
        _check_settings(workdir / "sources" / slugs[t.name] / "source.json",
                        {"name": t.name, "key": t.key})

    cache_dir = Path(reference_cache_dir or workdir / "reference_cache").expanduser()
    cache_id = hashlib.sha256(
        json.dumps([source_key, total, int(resolution), extractor.name]).encode()).hexdigest()[:16]
    ref_cache = cache_dir / f"ref_{cache_id}.npz"
    ref_dir = workdir / "reference"

    def unit_dir(t: TextSource, g: float) -> Path:
        return workdir / "sources" / slugs[t.name] / f"g{guidance_label(g)}"

    def unit_path(t: TextSource, g: float, k: int) -> Path:
        return unit_dir(t, g) / f"shard_{k:05d}.npz"


    def done(t: TextSource, g: float, k: int) -> bool:
        return _unit_done(unit_path(t, g, k), clip_key)

    units_total = num_shards * len(text_sources) * len(guidance_scales)
    units_done_before = sum(done(t, g, k) for k in range(num_shards)
                            for t in text_sources for g in guidance_scales)
    log(f"reconstruction FID: {total} images in {num_shards} shard(s) of {shard_size}; "
        f"{len(text_sources)} text source(s) x {len(guidance_scales)} guidance scale(s); "
        f"{units_done_before}/{units_total} units already done; extractor {extractor.name}")
    redo = sum(unit_path(t, g, k).is_file() for k in range(num_shards)
               for t in text_sources for g in guidance_scales) - units_done_before
    if redo:
        log(f"{redo} finished unit(s) lack CLIP cosines of {clip_key}: they are generated again")
    bar = log.bar(units_total, units_done_before)
    new_units = 0

    def extract(images: np.ndarray) -> np.ndarray:
        feats = [np.asarray(extractor(images[i:i + extract_batch_size]), np.float32)
                 for i in range(0, len(images), extract_batch_size)]
        return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)

    ref_feats_cache = _features_cache_path(ref_cache)
    for k in range(num_shards):
        have_shard_feats = (ref_dir / f"features_{k:05d}.npz").is_file()
        need_ref_feats = not ref_cache.is_file() and not have_shard_feats
        # KID needs the features themselves: kept whenever the shard is decoded anyway (a cache
        # from before KID has only the statistics); a shard is never decoded for them alone
        want_ref_feats = not ref_feats_cache.is_file() and not have_shard_feats
        need_ref_info = not (ref_dir / f"shard_{k:05d}.json").is_file()
        todo = [(t, g) for t in text_sources for g in guidance_scales if not done(t, g, k)]
        if not (need_ref_feats or need_ref_info or todo):
            continue
        records, images, skipped, index = _load_shard(source, k, shard_size, total, resolution,
                                                      log)
        ids = [str(r.get("id", "")) for r in records]
        _atomic_write_text(ref_dir / f"shard_{k:05d}.json",
                           json.dumps({"ids": ids, "skipped": skipped}, indent=1))
        # previews of the first `grid_rows` source images, wherever their shard is
        preview = [j for j, i in enumerate(index) if i < grid_rows]
        _save_previews(ref_dir / "previews", images[preview], k)
        if need_ref_feats or want_ref_feats:
            _atomic_savez(ref_dir / f"features_{k:05d}.npz", ids=np.array(ids, dtype=str),
                          features=extract(images))
        for t in text_sources:
            pending = [g for (s, g) in todo if s is t]
            if not pending:
                continue
            texts = _texts_for_shard(t, records, workdir / "sources" / slugs[t.name]
                                     / f"texts_{k:05d}.jsonl")
            for g in pending:
                generated = (resize_images(generate_fn(texts, g, shard_seed(seed, k)), resolution)
                             if texts else np.zeros((0, resolution, resolution, 3), np.uint8))
                if len(generated) != len(texts):
                    raise RuntimeError(f"generate_fn returned {len(generated)} images for "
                                       f"{len(texts)} prompts")
                _save_previews(unit_dir(t, g) / "previews", generated[preview], k)
                path = unit_path(t, g, k)
                _atomic_savez(path, ids=np.array(ids, dtype=str), features=extract(generated),
                              **_score_arrays(scorer, generated, records),
                              **_clip_arrays(clip, generated, texts))
                new_units += 1
                bar.update(1)
                info = {"source": t.name, "guidance": g, "shard": k, "path": str(path)}
                if on_shard_done is not None:
                    on_shard_done(info)
                if max_shards is not None and new_units >= max_shards:
                    remaining = units_total - units_done_before - new_units
                    bar.close()
                    if remaining > 0:
                        raise ProtocolStopped(new_units, remaining)
    bar.close()
    kid_settings = {"num_subsets": int(kid_subsets), "subset_size": int(kid_subset_size),
                    "seed": int(kid_seed)}
    # KID's cubic kernel (x.y/d + 1)^3 assumes x.y/d of order 1, as Inception's pool features give; an
    # extractor with larger features says by how much to scale them (`kid_feature_scale`), else KID
    # is dominated by x.y/d cubed (the world classifier's features, RMS 9.8, gave KIDs of +-1e5).
    feature_scale = float(getattr(extractor, "kid_feature_scale", 1.0))
    if feature_scale != 1.0:
        kid_settings["feature_scale"] = feature_scale
    return _finalise(workdir, text_sources, slugs, guidance_scales, num_shards, ref_cache,
                     settings, unit_path, unit_dir, grid_rows, source, resolution, log,
                     kid_settings, clip_key)


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def bar(self, total: int, initial: int) -> Any:
        if self.enabled:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc="units", unit="unit", file=sys.stderr)
        return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{path} was written with other settings: "
                + "; ".join(f"{k}: {a!r} (before) vs {b!r} (now)" for k, (a, b) in diff.items())
                + ". Use a new workdir (finished units would not be comparable).")
    else:
        _atomic_write_text(path, json.dumps(settings, indent=1))


def _load_shard(source: Any, k: int, shard_size: int, total: int, resolution: int,
                log: _Log) -> tuple[list[dict], np.ndarray, list[list[str]], list[int]]:
    """(records, uint8 images, [[id, reason]] skipped, source index of each record)."""
    records, images, skipped, index = [], [], [], []
    for i in range(k * shard_size, min((k + 1) * shard_size, total)):
        rid = str(i)
        try:
            rec = source[i]
            rid = str(rec.get("id", i))
            images.append(reference_image(rec["image"], resolution))
        except (CorruptExampleError, OSError, KeyError, ValueError) as e:
            skipped.append([rid, f"{type(e).__name__}: {e}"])
            log(f"skipped unreadable image {rid}: {e}")
            continue
        records.append(rec)
        index.append(i)
    arr = (np.stack(images) if images
           else np.zeros((0, resolution, resolution, 3), np.uint8))
    return records, arr, skipped, index


def _texts_for_shard(t: TextSource, records: list[dict], path: Path) -> list[str]:
    ids = [str(r.get("id", "")) for r in records]
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [r["id"] for r in rows] == ids:
            return [r["text"] for r in rows]
    texts = list(t.texts(records)) if records else []
    if len(texts) != len(records):
        raise RuntimeError(f"text source {t.name!r} gave {len(texts)} texts for {len(records)} "
                           "images")
    _atomic_write_text(path, "".join(json.dumps({"id": i, "text": s}, ensure_ascii=False) + "\n"
                                     for i, s in zip(ids, texts)))
    return texts


def _score_arrays(scorer: ImageScorer | None, images: np.ndarray,
                  records: list[dict]) -> dict[str, np.ndarray]:
    """The scorer's per-image (hits, counts) as npz fields `hits__METRIC`, `counts__METRIC`."""
    if scorer is None or not records:
        return {}
    out = {}
    for metric, (hits, counts) in scorer(images, records).items():
        hits, counts = np.asarray(hits, np.float64), np.asarray(counts, np.float64)
        if hits.shape != (len(records),) or counts.shape != (len(records),):
            raise RuntimeError(f"scorer metric {metric!r}: expected per-image arrays of {len(records)}, "
                               f"got {hits.shape} and {counts.shape}")
        out[f"hits__{metric}"], out[f"counts__{metric}"] = hits, counts
    return out


def _clip_arrays(clip: TextImageScorer | None, images: np.ndarray,
                 texts: list[str]) -> dict[str, np.ndarray]:
    """Per-image CLIP cosines against the prompts, as npz fields `clip_cos` and `clip_model`."""
    if clip is None:
        return {}
    cos = np.asarray(clip.cosines(images, texts), np.float64).reshape(-1)
    if cos.shape != (len(texts),):
        raise RuntimeError(f"CLIP scorer gave {cos.shape[0]} cosines for {len(texts)} images")
    return {"clip_cos": cos, "clip_model": np.array(clip.name)}


def _unit_done(path: Path, clip_key: str | None) -> bool:
    """A unit is done when its file exists (and holds CLIP cosines of `clip_key`, if asked)."""
    if not path.is_file():
        return False
    if clip_key is None:
        return True
    with np.load(path) as z:
        return "clip_model" in z.files and str(z["clip_model"]) == clip_key


def _pooled_clip(paths: list[Path], clip_key: str) -> float | None:
    """The CLIP score over every image of the units (None when a unit lacks this model's cosines)."""
    cos = []
    for p in paths:
        with np.load(p) as z:
            if "clip_cos" not in z.files or str(z["clip_model"]) != clip_key:
                return None
            cos.append(z["clip_cos"])
    from dediffusion_jax.evaluation.clip_score import clip_score

    value = clip_score(np.concatenate(cos)) if cos else float("nan")
    return value if math.isfinite(value) else None


def _features_cache_path(ref_cache: Path) -> Path:
    """CACHE/ref_<hash>.npz -> CACHE/features/ref_<hash>.npz: the reference features for KID, in a
    folder of their own so that CACHE/ref_*.npz stays the statistics alone."""
    return ref_cache.parent / "features" / ref_cache.name


def _reference_features(ref_cache: Path, ref_dir: Path, ref_ids: list[list[str]]
                        ) -> tuple[np.ndarray | None, str | None]:
    """All source-image features in shard order, for KID: from the cache's companion file, else
    from the workdir's per-shard files (then written to the cache); else (None, why)."""
    path = _features_cache_path(ref_cache)
    flat = [i for ids in ref_ids for i in ids]
    if path.is_file():
        ids, feats = _load_features(path)
        if ids != flat:
            return None, (f"KID n/a: {path} holds other image ids than this workdir's reference "
                          "shards (delete it to rebuild)")
        return feats, None
    shard_paths = [ref_dir / f"features_{k:05d}.npz" for k in range(len(ref_ids))]
    missing = [p.name for p in shard_paths if not p.is_file()]
    if missing:
        return None, (f"KID n/a: the reference cache {ref_cache.name} predates KID (statistics only) "
                      f"and {len(missing)} of WORKDIR/reference/features_*.npz are missing; use a "
                      "new --reference-cache folder to extract the reference features again")
    loaded = [_load_features(p) for p in shard_paths]
    if [i for ids, _ in loaded for i in ids] != flat:
        return None, "KID n/a: WORKDIR/reference/features_*.npz do not match the reference shards"
    feats = np.concatenate([f for _, f in loaded if len(f)] or [np.zeros((0, 0), np.float32)])
    _atomic_savez(path, ids=np.array(flat, dtype=str), features=feats)
    return feats, None


def _pooled_scores(paths: list[Path]) -> dict[str, float]:
    """sum(hits) / sum(counts) of every metric over the shards (0 where nothing was counted)."""
    hits: dict[str, float] = {}
    counts: dict[str, float] = {}
    for p in paths:
        with np.load(p) as z:
            for key in z.files:
                if key.startswith("hits__"):
                    m = key[len("hits__"):]
                    hits[m] = hits.get(m, 0.0) + float(z[key].sum())
                    counts[m] = counts.get(m, 0.0) + float(z[f"counts__{m}"].sum())
    return {m: hits[m] / max(counts[m], 1.0) for m in sorted(hits)}


def _merged_stats(paths: list[Path], name: str
                  ) -> tuple[FeatureStats | None, list[list[str]], list[np.ndarray]]:
    """(statistics merged shard by shard, ids per shard, the non-empty shards' features)."""
    stats, ids, kept = None, [], []
    for p in paths:
        shard_ids, feats = _load_features(p)
        ids.append(shard_ids)
        if len(feats) == 0:
            continue
        kept.append(feats)
        s = FeatureStats.from_features(feats, name)
        stats = s if stats is None else stats.merge(s)
    return stats, ids, kept


def _finalise(workdir, text_sources, slugs, guidance_scales, num_shards, ref_cache, settings,
              unit_path, unit_dir, grid_rows, source, resolution, log, kid_settings,
              clip_key) -> dict[str, Any]:
    ref_dir = workdir / "reference"
    infos = [json.loads((ref_dir / f"shard_{k:05d}.json").read_text()) for k in range(num_shards)]
    ref_ids = [info["ids"] for info in infos]
    skipped = [s for info in infos for s in info["skipped"]]
    name = settings["extractor"]
    if ref_cache.is_file():
        ref = FeatureStats.load(ref_cache)
    else:
        ref, _, _ = _merged_stats([ref_dir / f"features_{k:05d}.npz" for k in range(num_shards)],
                                  name)
        if ref is None:
            raise ValueError("no readable source images")
        ref_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref_cache.with_name(ref_cache.stem + ".tmp.npz")
        ref.save(tmp)
        os.replace(tmp, ref_cache)
        _atomic_write_text(ref_cache.with_suffix(".json"), json.dumps(
            {k: settings[k] for k in ("source", "num_images", "resolution", "extractor")},
            indent=1))

    ref_feats, kid_note = _reference_features(ref_cache, ref_dir, ref_ids)
    if kid_note:
        log(kid_note)

    rows = []
    for t in text_sources:
        fids: dict[str, float] = {}
        kids: dict[str, float | None] = {}
        kid_stds: dict[str, float | None] = {}
        scores: dict[str, dict[str, float]] = {}
        clips: dict[str, float | None] = {}
        for g in guidance_scales:
            label = guidance_label(g)
            paths = [unit_path(t, g, k) for k in range(num_shards)]
            stats, ids, feats = _merged_stats(paths, name)
            if "scorer" in settings:
                scores[label] = _pooled_scores(paths)
            if clip_key is not None:
                clips[label] = _pooled_clip(paths, clip_key)
            if ids != ref_ids:
                raise RuntimeError(f"{unit_dir(t, g)}: shard image ids differ from the reference "
                                   "shards (the source changed?); use a new workdir")
            fid = float("nan") if stats is None or stats.n < 2 or ref.n < 2 else fid_from_stats(
                stats, ref)
            fids[label] = fid
            kids[label] = kid_stds[label] = None
            if ref_feats is not None and stats is not None and stats.n >= 2 and len(ref_feats) >= 2:
                scale = kid_settings.get("feature_scale", 1.0)
                kids[label], kid_stds[label] = kernel_inception_distance(
                    scale * np.concatenate(feats), scale * ref_feats,
                    **{k: v for k, v in kid_settings.items() if k != "feature_scale"})
        finite = {g: f for g, f in fids.items() if math.isfinite(f)}
        best = min(finite, key=finite.get) if finite else None
        rows.append({"name": t.name, "key": t.key, "dir": f"sources/{slugs[t.name]}",
                     "fid": fids, "best_guidance": best,
                     "best_fid": finite[best] if best is not None else None,
                     "kid": kids, "kid_std": kid_stds,
                     "kid_at_best": kids[best] if best is not None else None,
                     **({"scores": scores} if scores else {}),
                     **({"clip_score": clips} if clip_key is not None else {})})

    results = {
        "protocol": settings,
        "guidance_scales": [guidance_label(g) for g in guidance_scales],
        "num_images": int(ref.n),
        "skipped_images": skipped,
        "sources": rows,
        "reference_stats": str(ref_cache),
        "kid_settings": kid_settings,
        "kid_note": kid_note,
        **({"clip_model": clip_key} if clip_key is not None else {}),
        "files": {"table": "results.md", "grid": "grid.png",
                  "grids": {guidance_label(g): f"grid_g{guidance_label(g)}.png"
                            for g in guidance_scales}},
    }
    from dediffusion_jax.evaluation import report

    _atomic_write_text(workdir / "results.json", json.dumps(results, indent=1) + "\n")
    _atomic_write_text(workdir / "results.md", report.markdown_table(results) + "\n")
    originals = _read_previews(ref_dir / "previews", grid_rows)
    names = [t.name for t in text_sources]
    for g in guidance_scales:
        cols = [_read_previews(unit_dir(t, g) / "previews", grid_rows) for t in text_sources]
        report.save_grid(workdir / f"grid_g{guidance_label(g)}.png", originals, cols,
                         ["original"] + [f"{n} (w={guidance_label(g)})" for n in names])
    best_cols, labels = [], ["original"]
    for t, row in zip(text_sources, rows):
        g = float(row["best_guidance"]) if row["best_guidance"] is not None else guidance_scales[0]
        best_cols.append(_read_previews(unit_dir(t, g) / "previews", grid_rows))
        labels.append(f"{t.name} (w={guidance_label(g)})")
    report.save_grid(workdir / "grid.png", originals, best_cols, labels)
    log(report.markdown_table(results))
    log(f"results: {workdir / 'results.json'}")
    return results
