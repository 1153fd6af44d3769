"""How many objects the redrawings of an ablation run show, and how much of world-FID that explains.

    python -m projects.miniworld.object_count --workdir workdirs/ablations --half select \\
        --runs default_steps600_seed0,default_steps600_seed1,single_steps600_seed0,single_steps600_seed1

Why: the per-cell occupancy score counts the empty cells as well (an all-empty prediction scores 0.62),
so a text that makes the third-party model draw ONE object where the scene has two loses little
occupancy, and object accuracy counts only the objects it does draw. World-FID sees it. This command
re-renders each run's texts exactly as the ablation runner did (same texts, noise and guidance; the
classifier features are checked against the runner's stored ones), counts the cells the world
classifier reads as occupied, and splits each run's Fréchet distance to the held-out scenes into its
mean term |mu_gen - mu_ref|^2 and covariance term, then measures the part of the mean term that lies
along the "one object drawn" direction (the mean feature of the redrawings that show one object
minus that of those that show two, pooled over the runs given).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

STORED_FEATURE_TOLERANCE = 1e-3  # the runner's stored features vs ours: the same images give 0.0


def drawn_objects(params: Any, config: Any, images: np.ndarray) -> np.ndarray:
    """[B] number of cells the world classifier reads as occupied in images ([B, 16, 16, 3] in [-1, 1])."""
    from projects.miniworld import classifier

    return classifier.predict_batched(params, np.asarray(images, np.float32), config=config)["occupied"].sum(axis=1)


def frechet_terms(generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The Fréchet distance of two feature sets split into mean and covariance terms (they add up)."""
    import scipy.linalg

    mu_g, mu_r = generated.mean(0), reference.mean(0)
    cov_g, cov_r = np.cov(generated, rowvar=False), np.cov(reference, rowvar=False)
    root = scipy.linalg.sqrtm(cov_g @ cov_r).real
    mean = float(((mu_g - mu_r) ** 2).sum())
    cov = float(np.trace(cov_g + cov_r - 2.0 * root))
    return {"fd": mean + cov, "mean_term": mean, "covariance_term": cov}


def one_object_direction(features: Sequence[np.ndarray], counts: Sequence[np.ndarray]) -> np.ndarray:
    """Unit vector: mean feature of redrawings showing one object minus those showing two (pooled)."""
    x, n = np.concatenate(features), np.concatenate(counts)
    if not (n == 1).any() or not (n == 2).any():
        raise ValueError("the one-object direction needs redrawings with one and with two objects")
    u = x[n == 1].mean(0) - x[n == 2].mean(0)
    return u / np.linalg.norm(u)


def mean_term_along(generated: np.ndarray, reference: np.ndarray, direction: np.ndarray) -> dict[str, float]:
    """The mean term and its part along `direction` (a unit vector)."""
    d = generated.mean(0) - reference.mean(0)
    along = float(d @ direction) ** 2
    total = float(d @ d)
    return {"mean_term": total, "along_one_object": along, "share_along": along / total if total else 0.0}


def _unit(workdir: Path, run: str, half: str, guidance: str) -> tuple[np.lib.npyio.NpzFile, np.ndarray]:
    evaldir = workdir / "runs" / run / "eval" / f"third_party_{half}"
    shard = evaldir / "sources" / "De-Diffusion_text" / f"g{guidance}" / "shard_00000.npz"
    refs = sorted(glob.glob(str(evaldir / "reference_cache" / "features" / "*.npz")))
    if not shard.is_file() or not refs:
        raise errors.UserError(f"{run}: no third-party evaluation of the {half} half at guidance {guidance} "
                               f"in {evaldir} (run the ablation runner on it first)")
    return np.load(shard), np.load(refs[0])["features"]


def measure(workdir: Path, runs: Sequence[str], half: str = "select", guidance: float = 2.0,
            progress: bool = True) -> dict[str, Any]:
    """Per run: drawn-object statistics against the truth and the Fréchet terms (see the module doc)."""
    from dediffusion_jax.evaluation.reconstruction import resize_images, shard_seed
    from dediffusion_jax.inference import TextEncoder
    from projects.miniworld import ablations, classifier, evaluator, scenes, third_party

    stored_protocol = workdir / "protocol.json"
    proto = (ablations.Protocol.from_json(json.loads(stored_protocol.read_text())) if stored_protocol.is_file()
             else ablations.FULL)
    halves = proto.halves()
    if half not in halves:
        raise errors.UserError(f"--half {half!r}: expected one of {', '.join(halves)}")
    indices = halves[half]
    g = f"{float(guidance):.1f}"
    truth = scenes.labels_of(indices)["occupied"].astype(int).sum(axis=1)
    units = {run: _unit(workdir, run, half, g) for run in runs}  # every run checked before loading models
    generate, _ = third_party.diffusers_renderer(third_party.SD_WORLD_DIR, proto.ddim_steps)
    params, config = classifier.load_classifier()
    rows: dict[str, Any] = {}
    features, counts, reference = {}, {}, None
    for run in runs:
        stored, reference = units[run]
        encoder = TextEncoder.from_checkpoint(workdir / "runs" / run / "train", batch_size=len(indices))
        texts = encoder.texts(scenes.images_of(indices))
        images = evaluator.to_float(resize_images(generate(texts, float(guidance), shard_seed(0, 0)),
                                                  scenes.IMAGE_SIZE))
        ours = classifier.features(params, images, config)
        gap = float(np.abs(ours - stored["features"]).max())
        if gap > STORED_FEATURE_TOLERANCE:
            raise RuntimeError(f"{run}: re-rendered features differ from the runner's stored ones by {gap:.3g}; "
                               "the redrawings are not the evaluated ones (a changed model or protocol?)")
        n = drawn_objects(params, config, images)
        features[run], counts[run] = stored["features"], n
        rows[run] = {"drawn_mean": float(n.mean()), "truth_mean": float(truth.mean()),
                     "drawn_one": float((n == 1).mean()), "fewer_than_truth": float((n < truth).mean()),
                     "more_than_truth": float((n > truth).mean()), "stored_feature_gap": gap,
                     **frechet_terms(stored["features"], reference)}
        if progress:
            print(f"{run}: {rows[run]['drawn_mean']:.3f} objects drawn per scene (truth "
                  f"{rows[run]['truth_mean']:.3f}), one object in {rows[run]['drawn_one']:.1%}", flush=True)
    direction = one_object_direction(list(features.values()), list(counts.values()))
    for run in runs:
        rows[run].update({k: v for k, v in mean_term_along(features[run], reference, direction).items()
                          if k != "mean_term"})
    return {"half": half, "guidance": float(guidance), "scenes": int(len(indices)), "runs": rows}


def markdown(result: Mapping[str, Any]) -> str:
    """One row per run: objects drawn, then world-FID split into its terms."""
    head = (f"Third-party redrawings of the {result['half']} half ({result['scenes']} scenes), guidance "
            f"{result['guidance']:g}\n\n| run | objects drawn (truth) | one object drawn | fewer than the scene "
            "| world-FID | mean term | of it along 'one object drawn' | covariance term |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for run, r in result["runs"].items():
        lines.append(f"| {run} | {r['drawn_mean']:.2f} ({r['truth_mean']:.2f}) | {r['drawn_one']:.1%} | "
                     f"{r['fewer_than_truth']:.1%} | {r['fd']:.1f} | {r['mean_term']:.1f} | "
                     f"{r['along_one_object']:.1f} ({r['share_along']:.0%}) | {r['covariance_term']:.1f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.object_count", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="workdirs/ablations", help="the ablation runner's workdir")
    p.add_argument("--runs", required=True, help="comma-separated run names (folders of WORKDIR/runs)")
    p.add_argument("--half", default="select", help="select or report")
    p.add_argument("--guidance", type=float, default=2.0, help="a third-party guidance the runner evaluated")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)


def main(argv: list[str] | None = None) -> int:
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs:
        raise errors.UserError("--runs: give at least one run name")
    result = measure(Path(args.workdir), runs, args.half, args.guidance)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
