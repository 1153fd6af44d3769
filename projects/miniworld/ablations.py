"""The paper's ablations in the miniature world: one command, several seeds, tables and plots beside the paper's.

    python -m projects.miniworld.ablations --family tokens --workdir workdirs/ablations
    python -m projects.miniworld.ablations --family all --workdir workdirs/ablations --hours 2
    python -m projects.miniworld.ablations --report --workdir workdirs/ablations --publish docs/ablations

Each setting of a family is a world config argument (projects/miniworld/configs/world.py) trained with
the shared trainer in its own run directory, WORKDIR/runs/NAME (NAME: setting, steps, seed). A run
whose result.json exists is skipped; a run stopped at any point (SIGTERM, Ctrl-C, --hours, a crash)
resumes from its last checkpoint or its last finished evaluation unit when the command is run again,
any number of times. Runs shared by several families (the world default) are trained once.

Each run is evaluated with the paper's protocol on held-out scenes split in two halves: the text is
redrawn by the THIRD-PARTY model (assets/sd_world, diffusers' pipeline) and by the training decoder,
each over a guidance sweep; the guidance is chosen on the SELECT half (object accuracy, then
world-FID) and the numbers are reported on the REPORT half, so no reported number chose its own
setting. The same split chooses the best setting of a family. The world LLM reads each run's
report-half texts (0-shot VQA, `ablation_llm`): the accuracy the paper pairs with every FID. The
caption references (short, full) are evaluated once per workdir.

Outputs (rewritten after every run): WORKDIR/ablations.json (every run's result and each family's
aggregate: mean and spread over seeds), WORKDIR/ablations.md (a table per family in the paper's
shape, the paper's numbers beside ours) and WORKDIR/plots/FAMILY.png. --publish DIR copies them into
DIR (the committed copy is docs/ablations/). --reduced is the same pipeline at toy size (CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dediffusion_jax import errors
from dediffusion_jax.cli_flags import answer_help_early

HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "configs" / "world.py"
SMALL_BACKBONE = "{small_backbone}"  # placeholder in a setting's arg: the prerequisite's folder
METRICS = ("object", "colour", "shape", "occupancy", "background", "world_fid", "world_kid")
REFERENCES_LLM = "references_llm.json"  # the caption references' world-LLM VQA (ablation_llm.caption_vqa)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of a family: `arg` for configs/world.py (steps apart), `steps` (None: the protocol's),
    and the paper's analogous row (label, FID, 5-way 1-shot accuracy; None where it has none)."""

    key: str
    label: str
    arg: str = ""
    steps: int | None = None
    paper: tuple[str, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """A paper ablation and its world analogue; `paper_choice`: the setting the paper keeps."""

    name: str
    title: str
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...] = (0, 1)
    paper_choice: str = "default"
    paper_trend: str = ""
    why: str = ""


DEFAULT = Setting("default", "world default")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("punctuation", "Punctuation in the vocabulary", (
        Setting("default", "excluded (world default)", paper=("excluded", 6.43, 97.0)),
        Setting("punct", "included", "punct", paper=("included", 6.85, 96.8))),
        paper_trend="excluding punctuation is better (6.43 vs 6.85)",
        why="the world's full captions separate objects with ',', which the decoder has read in training"),
    Family("depth", "Attentional pooler depth", (
        Setting("depth1", "1 block", "depth=1", paper=("3 blocks", 6.85, 96.6)),
        Setting("default", "2 blocks (world default)", paper=("5 blocks", 6.43, 97.0)),
        Setting("depth4", "4 blocks", "depth=4", paper=("9 blocks", 6.76, 93.1))),
        paper_trend="the middle depth is best (5 beats 3 and 9)"),
    Family("data", "Training images", (
        Setting("default", "all train scenes, 1-2 objects (world default)", paper=("WebLI", 6.43, 97.0)),
        Setting("single", "one-object scenes only", "images=single", paper=("ImageNet-1K", 6.93, 97.2)),
        Setting("pool", "a fixed pool of 64 scenes", "images=pool", paper=("COCO train 2014 (83K)", 7.53, 85.8))),
        paper_trend="more and more diverse images help (WebLI 6.43 < ImageNet 6.93 < COCO 7.53)"),
    Family("tokens", "Number of tokens", (
        Setting("tokens2", "2", "tokens=2", paper=("5", 9.19, 97.8)),
        Setting("tokens4", "4", "tokens=4", paper=("15", 7.42, 97.6)),
        Setting("tokens8", "8", "tokens=8", paper=("45", 6.95, 97.0)),
        Setting("default", "12 (world default)"),
        Setting("tokens14", "14 (the context's most)", "tokens=14", paper=("75", 6.43, 97.0))),
        seeds=(0, 1, 2), paper_choice="tokens14",
        paper_trend="more tokens reconstruct better (FID 9.19 -> 6.43 from 5 to 75 tokens)"),
    Family("ours", "Choices the paper does not state", (
        Setting("default", "world default: soft Gumbel, log-mean loss, t in (0.5, 1), diversity 0.01"),
        Setting("hard", "straight-through (hard) Gumbel", "relax=hard"),
        Setting("mean", "plain mean loss (the paper's)", "reduction=mean"),
        Setting("top", "t in (0.8, 1) only", "timesteps=top"),
        Setting("nodiv", "no slot-diversity term", "diversity=0"))),
    Family("backbone", "Backbone", (
        Setting("default", "world CLIP image tower, frozen (world default)", paper=("ViT-L pre-trained, frozen", 6.43, 97.0)),
        Setting("small", "smaller world CLIP image tower (width 64, 2 layers), frozen", f"backbone={SMALL_BACKBONE}",
                paper=("ViT-B pre-trained, frozen", 6.84, 92.6)),
        Setting("scratch", "random init, trained end to end", "backbone=scratch",
                paper=("ViT-L random, 300K steps", 14.6, 67.2)),
        Setting("scratch_long", "random init, trained end to end, 2x steps", "backbone=scratch", steps=-2,
                paper=("ViT-L random, 500K steps", 11.0, 72.2))),
        paper_trend="a pre-trained backbone is far better than random init; the larger one is better"),
    Family("length", "Training length", (
        Setting("half", "0.5x", steps=-0.5),
        Setting("default", "1x (the demo's)"),
        Setting("x4", "4x", steps=-4),
        Setting("x8", "8x", steps=-8)),
        paper_trend="no such ablation (it trains 300K steps for the ablations, 500K for the headline); here: "
                    "how far the text gets from the short caption towards the full caption with compute"),
)}
ORDER = ("punctuation", "depth", "data", "tokens", "ours", "backbone", "length")  # cheapest new runs first


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Run length and evaluation of every run of one workdir (recorded in protocol.json)."""

    steps: int = 600
    scenes: int = 256  # held-out scenes, split in two halves
    ddim_steps: int = 12
    own_guidance: tuple[float, ...] = (1.0, 3.0)
    third_guidance: tuple[float, ...] = (1.0, 2.0, 3.0)
    small_backbone_steps: int = 2000
    max_settings: int = 0  # 0: every setting of a family (reduced mode: the first few)

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> "Protocol":
        """The protocol a protocol.json (or a published ablations.json) recorded."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})

    def steps_of(self, setting: Setting) -> int:
        """A setting's steps: its own (> 0), a multiple of the protocol's (< 0), or the protocol's."""
        if setting.steps is None:
            return self.steps
        return int(setting.steps) if setting.steps > 0 else max(1, round(-setting.steps * self.steps))

    def halves(self) -> dict[str, Any]:
        """{"select": indices, "report": indices}: alternate scenes of the fixed held-out order."""
        from projects.miniworld import scenes

        idx = scenes.evaluation_indices(self.scenes)
        return {"select": idx[0::2], "report": idx[1::2]}


FULL = Protocol()
REDUCED = Protocol(steps=8, scenes=8, ddim_steps=2, own_guidance=(1.0,), third_guidance=(1.0, 3.0),
                   small_backbone_steps=4, max_settings=2)


@dataclasses.dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.setting.key}_steps{self.steps}_seed{self.seed}"


def runs_of(family: Family, seeds: Sequence[int] | None, protocol: Protocol) -> list[Run]:
    """Seed-major order: every setting once before any second seed, so a partial table compares."""
    settings = family.settings[:protocol.max_settings] if protocol.max_settings else family.settings
    return [Run(s, seed, protocol.steps_of(s)) for seed in (seeds or family.seeds) for s in settings]


class Stopped(Exception):
    """A run saved and stopped before its end (signal or time budget); the same command resumes it."""


# ---------------------------------------------------------------------------------------------------
# Training and evaluating one run.


def run_config(run: Run, workdir: Path) -> Any:
    """The world config of a run: its arg, steps and seed, no in-training evaluation."""
    from dediffusion_jax.train.cli import load_config_file

    arg = run.setting.arg.replace(SMALL_BACKBONE, str(workdir / "prereq" / "backbone_small"))
    parts = [p for p in (arg, f"steps={run.steps}", "eval_every=0") if p]
    config = load_config_file(f"{CONFIG_FILE}:{','.join(parts)}")
    with config.unlocked():
        config.seed = run.seed
        config.lr.warmup_steps = min(int(config.lr.warmup_steps), max(1, run.steps // 10))
        config.checkpoint.every_steps = max(1, min(int(config.checkpoint.every_steps), run.steps // 2))
        config.log.samples_every = 0
        config.log.tensorboard = False
    return config


def train_run(run: Run, workdir: Path, deadline: float | None) -> dict[str, Any]:
    """Trains (or resumes) one run; raises Stopped when it saved before its last step."""
    from dediffusion_jax.train.loop import train_and_evaluate

    minutes = 0.0 if deadline is None else max((deadline - time.time()) / 60.0, 0.01)
    start = time.time()
    summary = train_and_evaluate(run_config(run, workdir), workdir / "runs" / run.name / "train",
                                 stop_after_minutes=minutes)
    if summary.get("preempted"):
        raise Stopped(f"{run.name} stopped at step {summary['step']} of {run.steps}")
    return {"train_wall_s": round(time.time() - start, 1), "start_step": summary.get("start_step"),
            "steps_per_s": summary.get("steps_per_s"),
            "compile_s": summary.get("compile_seconds")}


class Renderers:
    """The third-party model's generate function, loaded once per process."""

    def __init__(self, protocol: Protocol):
        self.protocol, self._third = protocol, None

    def third_party(self) -> tuple[Any, str]:
        if self._third is None:
            from projects.miniworld import third_party

            self._third = third_party.diffusers_renderer(third_party.SD_WORLD_DIR, self.protocol.ddim_steps)
        return self._third


def evaluate_sources(sources: Sequence[Any], decoder: Any, protocol: Protocol, renderers: Renderers,
                     evaldir: Path) -> dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]:
    """{decoder: {half: {source: {guidance: metrics}}}} for both decoders and both halves."""
    from projects.miniworld import evaluator

    out: dict[str, Any] = {"third_party": {}, "training_decoder": {}}
    generate, key = renderers.third_party()
    for half, indices in protocol.halves().items():
        out["third_party"][half] = _metrics(evaluator.evaluate(
            None, sources, indices, evaldir / f"third_party_{half}", num_steps=protocol.ddim_steps,
            guidance_scales=protocol.third_guidance, generate_fn=generate, generator_key=key, progress=True))
        out["training_decoder"][half] = _metrics(evaluator.evaluate(
            decoder, sources, indices, evaldir / f"training_decoder_{half}", num_steps=protocol.ddim_steps,
            guidance_scales=protocol.own_guidance, progress=True))
    return out


def _metrics(results: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The protocol's results -> {source: {guidance: {object, ..., world_fid, world_kid}}}."""
    out = {}
    for row in results["sources"]:
        out[row["name"]] = {g: {**{k: float(v) for k, v in row["scores"][g].items()},
                                "world_fid": float(row["fid"][g]),
                                "world_kid": None if row.get("kid", {}).get(g) is None else float(row["kid"][g])}
                            for g in row["scores"]}
    return out


def evaluate_run(run: Run, workdir: Path, protocol: Protocol, renderers: Renderers) -> dict[str, Any]:
    """The run's De-Diffusion texts for both halves, redrawn and scored (cached per unit)."""
    import numpy as np

    from dediffusion_jax.inference import TextEncoder
    from projects.miniworld import ablation_llm, evaluator, scenes

    rundir = workdir / "runs" / run.name
    indices = np.concatenate(list(protocol.halves().values()))
    encoder = TextEncoder.from_checkpoint(rundir / "train", batch_size=len(indices))
    texts = encoder.texts(scenes.images_of(indices))
    source = evaluator.TextsOfScenes(evaluator.DE_DIFFUSION, dict(zip(indices.tolist(), texts)), key=encoder.key)
    start = time.time()
    scores = evaluate_sources([source], encoder.decoder, protocol, renderers, rundir / "eval")
    report = protocol.halves()["report"]
    by_index = dict(zip(indices.tolist(), texts))
    report_texts = [by_index[int(i)] for i in report]
    llm = ablation_llm.vqa_accuracy(by_index, report, rundir / "eval" / "llm", name=evaluator.DE_DIFFUSION)
    return {"scores": {d: {h: rows[evaluator.DE_DIFFUSION] for h, rows in halves.items()}
                       for d, halves in scores.items()},
            "llm": llm, "text_statistics": evaluator.text_statistics(report_texts, report),
            "distinct_texts": len(set(report_texts)), "texts": report_texts, "eval_wall_s": round(time.time() - start, 1)}


def evaluate_references(workdir: Path, protocol: Protocol, renderers: Renderers) -> dict[str, Any]:
    """The caption sources through both decoders, once per workdir (references.json)."""
    from projects.miniworld import evaluator
    from dediffusion_jax.t2i.folder import load_decoder

    path = workdir / "references.json"
    if path.is_file():
        out = json.loads(path.read_text())
    else:
        decoder = load_decoder(HERE / "assets" / "decoder")
        scores = evaluate_sources(evaluator.caption_sources(), decoder, protocol, renderers, workdir / "references")
        out = {name: {d: {h: scores[d][h][name] for h in scores[d]} for d in scores}
               for name in next(iter(next(iter(scores.values())).values()))}
        _write_json(path, out)
    llm_path = workdir / REFERENCES_LLM
    if not llm_path.is_file():
        from projects.miniworld import ablation_llm

        _write_json(llm_path, ablation_llm.caption_vqa(protocol.halves()["report"], workdir / "references" / "llm"))
    return out


def llm_of_run(run_name: str, workdir: Path, protocol: Protocol) -> dict[str, Any] | None:
    """The LLM column of a run finished before the column existed (None without its checkpoint)."""
    from projects.miniworld import ablation_llm, evaluator

    rundir = workdir / "runs" / run_name
    if not (rundir / "train" / "checkpoints").is_dir():
        return None
    report = protocol.halves()["report"]
    texts = ablation_llm.run_texts(rundir / "train", report)
    return ablation_llm.vqa_accuracy(texts, report, rundir / "eval" / "llm", name=evaluator.DE_DIFFUSION)


def ensure_small_backbone(workdir: Path, protocol: Protocol) -> Path:
    """The backbone family's smaller pre-trained world CLIP (resumable; ~4 min at 2,000 steps)."""
    out = workdir / "prereq" / "backbone_small"
    if (out / "model.safetensors").is_file():
        return out
    from projects.miniworld import pretrain_backbone

    _say(f"prerequisite: the smaller world CLIP (width 64, 2 layers, {protocol.small_backbone_steps} steps) -> {out}")
    code = pretrain_backbone.main(["--out", str(out), "--workdir", str(workdir / "prereq" / "backbone_small_run"),
                                   "--steps", str(protocol.small_backbone_steps), "--width", "64", "--layers", "2",
                                   *(["--batch", "16"] if protocol.small_backbone_steps < 100 else [])])
    if code != 0 or not (out / "model.safetensors").is_file():
        raise Stopped("the smaller world CLIP did not finish; run the same command again to resume it")
    return out


# ---------------------------------------------------------------------------------------------------
# Aggregation: the best guidance chosen on one half, reported on the other; mean and spread over seeds.


def chosen(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """{guidance, **report-half metrics}: the guidance whose SELECT-half row is best (object, then FID)."""
    select = scores["select"]
    g = max(select, key=lambda k: (select[k]["object"], -select[k]["world_fid"]))
    return {"guidance": g, **scores["report"][g]}


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    import numpy as np

    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def aggregate(family: Family, results: Mapping[str, Mapping[str, Any]], protocol: Protocol,
              seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Per setting: chosen metrics per seed, mean/std; the best setting by the SELECT half; and, for
    each setting against the paper's choice, whether the difference exceeds the seeds' spread."""
    rows = {}
    for setting in (family.settings[:protocol.max_settings] if protocol.max_settings else family.settings):
        runs = [r for r in runs_of(dataclasses.replace(family, settings=(setting,)), seeds, protocol)
                if r.name in results]
        per_seed = {d: [chosen(results[r.name]["scores"][d]) for r in runs] for d in ("third_party", "training_decoder")}
        select_object = [max(v["object"] for v in results[r.name]["scores"]["third_party"]["select"].values())
                         for r in runs]
        rows[setting.key] = {
            "label": setting.label, "paper": setting.paper, "seeds": [r.seed for r in runs],
            "runs": [r.name for r in runs],
            "third_party": {m: mean_std([c[m] for c in per_seed["third_party"]]) for m in METRICS},
            "training_decoder": {m: mean_std([c[m] for c in per_seed["training_decoder"]]) for m in METRICS},
            "per_seed": {d: {m: [c[m] for c in per_seed[d]] for m in ("object", "world_fid")} for d in per_seed},
            "guidance": [c["guidance"] for c in per_seed["third_party"]],
            "text_recall": mean_std([results[r.name]["text_statistics"].get("recall") for r in runs]),
            "llm_vqa": mean_std([results[r.name].get("llm", {}).get("all") for r in runs]),
            "llm_vqa_informative": mean_std([results[r.name].get("llm", {}).get("informative") for r in runs]),
            "select_object": mean_std(select_object),
        }
    done = {k: r for k, r in rows.items() if r["third_party"]["object"]["n"]}
    best = max(done, key=lambda k: done[k]["select_object"]["mean"]) if done else None
    ref = family.paper_choice if family.paper_choice in done else None
    for key, row in done.items():
        if ref and key != ref:
            a, b = row["third_party"]["object"], done[ref]["third_party"]["object"]
            diff = a["mean"] - b["mean"]
            spread = (a["std"] or 0.0) + (b["std"] or 0.0)
            row["vs_paper_choice"] = {"object_diff": diff, "spread": spread,
                                      "beyond_spread": bool(min(a["n"], b["n"]) > 1 and abs(diff) > spread)}
    return {"name": family.name, "title": family.title, "rows": rows, "best_on_select_half": best,
            "paper_choice": family.paper_choice, "paper_trend": family.paper_trend, "why": family.why}


def _pm(stat: Mapping[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    if not stat or stat.get("mean") is None:
        return "…"
    spread = f" ± {stat['std'] * scale:.{digits}f}" if stat["n"] > 1 else ""
    return f"{stat['mean'] * scale:.{digits}f}{spread}"


def _kid(row: Mapping[str, Any]) -> str:
    return "…" if row.get("world_kid") is None else f"{1e3 * row['world_kid']:.1f}"


def family_table(agg: Mapping[str, Any], references: Mapping[str, Any] | None = None,
                 references_llm: Mapping[str, Any] | None = None) -> str:
    """The paper's row beside ours: third-party object accuracy and world-FID (mean ± std over seeds,
    report half, guidance chosen on the select half), the training decoder's, text recall, and the
    world LLM's 0-shot VQA accuracy (%) on the texts (the paper's accuracy column; ablation_llm)."""
    lines = [f"### {agg['title']}", "",
             "| setting (world) | paper: setting, FID ↓ / 5-way acc | third-party: objects ↑ | colour | shape | "
             "background | world-FID ↓ | world-KID ×10³ ↓ | training decoder: objects ↑ | world-FID ↓ | "
             "text recall | world-LLM VQA % ↑ | seeds | objects vs the paper's choice (or the default) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, row in agg["rows"].items():
        t, o = row["third_party"], row["training_decoder"]
        paper = f"{row['paper'][0]}: {row['paper'][1]} / {row['paper'][2]}" if row["paper"] else "—"
        label = f"**{row['label']}**" if key == agg["best_on_select_half"] else row["label"]
        vs = row.get("vs_paper_choice")
        versus = "—" if vs is None else (f"{vs['object_diff']:+.3f}" + (" (beyond spread)" if vs["beyond_spread"]
                                                                           else " (within spread)"))
        lines.append(f"| {label} | {paper} | {_pm(t['object'])} | {_pm(t['colour'])} | {_pm(t['shape'])} | "
                     f"{_pm(t['background'])} | {_pm(t['world_fid'], 1)} | {_pm(t['world_kid'], 1, 1e3)} | "
                     f"{_pm(o['object'])} | {_pm(o['world_fid'], 1)} | {_pm(row['text_recall'])} | "
                     f"{_pm(row.get('llm_vqa', {}), 1, 100)} | {len(row['seeds'])} | {versus} |")
    if references:
        for name in ("short caption", "full caption (upper ref.)"):
            if name in references:
                t = chosen(references[name]["third_party"])
                o = chosen(references[name]["training_decoder"])
                llm = (references_llm or {}).get(name)
                llm_text = "…" if llm is None else f"{100 * llm['all']:.1f}"
                lines.append(f"| *{name}* | — | {t['object']:.3f} | {t['colour']:.3f} | {t['shape']:.3f} | "
                             f"{t['background']:.3f} | {t['world_fid']:.1f} | "
                             f"{_kid(t)} | "
                             f"{o['object']:.3f} | {o['world_fid']:.1f} | — | "
                             f"{llm_text} | — | — |")
    best = agg["best_on_select_half"]
    lines += ["", f"Paper: {agg['paper_trend']}." if agg["paper_trend"] else "",
              f"Best here (chosen on the select half, in bold): {agg['rows'][best]['label'] if best else 'none yet'}."]
    return "\n".join(line for line in lines if line is not None)


def plot_family(agg: Mapping[str, Any], path: Path) -> Path | None:
    """Object accuracy and world-FID per setting (mean ± std, each seed a dot), the paper's FID beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, r) for k, r in agg["rows"].items() if r["third_party"]["object"]["n"]]
    if not rows:
        return None
    has_paper = any(r["paper"] for _, r in rows)
    fig, axes = plt.subplots(1, 3 if has_paper else 2, figsize=(4.2 * (3 if has_paper else 2), 3.4))
    x = list(range(len(rows)))
    labels = [r["label"].split(" (")[0][:22] for _, r in rows]
    for ax, metric, title in ((axes[0], "object", "objects ↑ (report half)"), (axes[1], "world_fid", "world-FID ↓ (report half)")):
        for decoder, colour, shift in (("third_party", "C0", -0.06), ("training_decoder", "C1", 0.06)):
            means = [r[decoder][metric]["mean"] for _, r in rows]
            stds = [r[decoder][metric]["std"] or 0.0 for _, r in rows]
            ax.errorbar([i + shift for i in x], means, yerr=stds, fmt="o-", color=colour, capsize=3,
                        label="third-party (sd_world)" if decoder == "third_party" else "training decoder")
            for i, (_, r) in enumerate(rows):  # each seed a dot
                seeds = r.get("per_seed", {}).get(decoder, {}).get(metric, [])
                ax.plot([i + shift] * len(seeds), seeds, ".", color=colour, alpha=0.45)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    if has_paper:
        px = [i for i, (_, r) in enumerate(rows) if r["paper"]]
        axes[2].plot(px, [rows[i][1]["paper"][1] for i in px], "s--", color="C2")
        axes[2].set_xticks(px, [rows[i][1]["paper"][0][:22] for i in px], rotation=20, ha="right", fontsize=7)
        axes[2].set_title("paper: FID ↓ (COCO, SD2)", fontsize=9)
    fig.suptitle(agg["title"], fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_families(families: Sequence[str], results: Mapping[str, Any], protocol: Protocol) -> list[str]:
    """The command's families and every other family with a stored run, in ORDER: a command that runs
    one family (`--family length`) must not drop the others from the published table."""
    seeds = sorted({int(name.rsplit("_seed", 1)[1]) for name in results if name.rsplit("_seed", 1)[-1].isdigit()})

    def stored(name: str) -> bool:
        return any(run.name in results for run in runs_of(FAMILIES[name], seeds or None, protocol))

    return [name for name in ORDER if name in families or stored(name)]


def write_report(workdir: Path, protocol: Protocol, families: Sequence[str], seeds: Sequence[int] | None) -> dict:
    """ablations.json, ablations.md and plots/ from the stored results alone (no training).

    Every family with a stored run is reported (not only `families`), each over its own seeds plus
    `seeds`: running `--seeds 1` to add a seed keeps seed 0 in the table."""
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted((workdir / "runs").glob("*/result.json"))}
    families = report_families(families, results, protocol)
    references_path = workdir / "references.json"
    references = json.loads(references_path.read_text()) if references_path.is_file() else None
    references_llm_path = workdir / REFERENCES_LLM
    references_llm = json.loads(references_llm_path.read_text()) if references_llm_path.is_file() else None
    aggs = {name: aggregate(FAMILIES[name], results, protocol, sorted(set(FAMILIES[name].seeds) | set(seeds or ())))
            for name in families}
    parts = [f"# Ablations in the miniature world ({workdir.name})", "",
             f"Protocol: {protocol.steps} training steps per run (unless the setting says), "
             f"{protocol.scenes} held-out scenes in two halves, DDIM {protocol.ddim_steps}; third-party guidance "
             f"{list(protocol.third_guidance)}, training decoder {list(protocol.own_guidance)}; mean ± std over seeds "
             "of the report half at the guidance chosen on the select half; a difference is beyond the spread "
             "when it exceeds the sum of both settings' standard deviations. Runs finished: "
             f"{len(results)}.", ""]
    for name, agg in aggs.items():
        parts += [family_table(agg, references, references_llm), "",
                  f"![{name}](plots/{name}.png)" if plot_family(agg, workdir / "plots" / f"{name}.png") else "", ""]
    (workdir / "ablations.md").write_text("\n".join(parts) + "\n")
    _write_json(workdir / "ablations.json", {"protocol": dataclasses.asdict(protocol), "families": aggs,
                                             "references": references, "references_llm": references_llm,
                                             "runs": results})
    return aggs


# ---------------------------------------------------------------------------------------------------
# The command.


def _add_llm_column(path: Path, run_name: str, workdir: Path, protocol: Protocol, llm_fn: Callable) -> None:
    """Fills in the world-LLM column of a finished run that lacks it (where its checkpoint is here)."""
    result = json.loads(path.read_text())
    if "llm" in result:
        return
    llm = llm_fn(run_name, workdir, protocol)
    if llm is not None:
        _say(f"  {run_name}: world-LLM VQA {100 * llm['all']:.1f}% (column added to a finished run)")
        _write_json(path, {**result, "llm": llm})


def run_families(families: Sequence[str], workdir: Path, protocol: Protocol, seeds: Sequence[int] | None = None,
                 hours: float = 0.0, train_fn: Callable | None = None, eval_fn: Callable | None = None,
                 references_fn: Callable | None = None, llm_fn: Callable | None = None) -> dict[str, Any]:
    """Trains and evaluates every run of `families` not yet finished, writing the report after each.

    Returns {"finished": [...], "skipped": [...], "stopped": reason or None}. `train_fn(run, workdir,
    deadline)`, `eval_fn(run, workdir, protocol, renderers)`, `references_fn` and `llm_fn(run name,
    workdir, protocol)` (the LLM column of a run finished before it existed) default to the real ones
    (tests pass stand-ins)."""
    train_fn, eval_fn, llm_fn = train_fn or train_run, eval_fn or evaluate_run, llm_fn or llm_of_run
    references_fn = references_fn or evaluate_references
    workdir.mkdir(parents=True, exist_ok=True)
    _check_protocol(workdir, protocol)
    deadline = time.time() + 3600 * hours if hours else None
    renderers = Renderers(protocol)
    finished, skipped, seen = [], [], set()
    try:
        references_fn(workdir, protocol, renderers)
        for name in families:
            family = FAMILIES[name]
            for run in runs_of(family, seeds, protocol):
                if run.name in seen:
                    continue
                seen.add(run.name)
                rundir = workdir / "runs" / run.name
                if (rundir / "result.json").is_file():
                    skipped.append(run.name)
                    _add_llm_column(rundir / "result.json", run.name, workdir, protocol, llm_fn)
                    continue
                if deadline is not None and time.time() > deadline:
                    raise Stopped(f"the --hours budget is spent before {run.name}")
                if SMALL_BACKBONE in run.setting.arg:
                    ensure_small_backbone(workdir, protocol)
                _say(f"[{name}] {run.name}: {run.setting.label}, seed {run.seed}, {run.steps} steps")
                trained = rundir / "trained.json"
                if not trained.is_file():
                    _write_json(trained, train_fn(run, workdir, deadline))
                result = {"run": run.name, "family_setting": run.setting.key, "arg": run.setting.arg,
                          "seed": run.seed, "steps": run.steps, **json.loads(trained.read_text()),
                          **eval_fn(run, workdir, protocol, renderers)}
                _write_json(rundir / "result.json", result)
                finished.append(run.name)
                tp = chosen(result["scores"]["third_party"])
                _say(f"  -> third-party objects {tp['object']:.3f}, world-FID {tp['world_fid']:.1f} (w={tp['guidance']}); "
                     f"train {result.get('train_wall_s')} s, eval {result.get('eval_wall_s')} s")
                write_report(workdir, protocol, families, seeds)
    except (Stopped, KeyboardInterrupt) as e:
        write_report(workdir, protocol, families, seeds)
        reason = str(e) or "interrupted"
        _say(f"stopped: {reason}; run the same command again to resume")
        return {"finished": finished, "skipped": skipped, "stopped": reason}
    write_report(workdir, protocol, families, seeds)
    return {"finished": finished, "skipped": skipped, "stopped": None}


def _check_protocol(workdir: Path, protocol: Protocol) -> None:
    """One protocol per workdir: a table never mixes run lengths or scene sets."""
    path = workdir / "protocol.json"
    mine = json.loads(json.dumps(dataclasses.asdict(protocol)))
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != mine:
            changed = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
            raise errors.UserError(f"{workdir} holds runs of another protocol ({', '.join(changed)} differ: "
                                   f"{ {k: stored.get(k) for k in changed} }); use another --workdir")
    else:
        _write_json(path, mine)


def _write_json(path: Path, obj: Any) -> None:
    """Written whole or not at all: a file next to it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    tmp.replace(path)


def _say(msg: str) -> None:
    print(msg, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m projects.miniworld.ablations", description=__doc__.splitlines()[0])
    p.add_argument("--family", default="all", help=f"one of {', '.join(ORDER)}, a comma-separated list, or all")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the family's: 3 for tokens, 2 else)")
    p.add_argument("--workdir", default="workdirs/ablations")
    p.add_argument("--hours", type=float, default=0.0, help="stop cleanly (resumably) after this long (0: no limit)")
    p.add_argument("--report", action="store_true", help="only write the tables and plots from stored results")
    p.add_argument("--publish", help="copy ablations.md, ablations.json and plots/ into this folder")
    p.add_argument("--import", dest="import_from", metavar="ABLATIONS_JSON",
                   help="first take the finished runs of a published ablations.json (e.g. "
                        "docs/ablations/ablations.json) as done, where the workdir has none")
    p.add_argument("--reduced", action="store_true",
                   help=f"toy size for CI: {REDUCED.steps} steps, {REDUCED.scenes} scenes, the first "
                        f"{REDUCED.max_settings} settings of each family")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad family or seed) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    families = list(ORDER) if args.family == "all" else [f.strip() for f in args.family.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise errors.UserError(f"--family {args.family!r}: expected all or some of {', '.join(ORDER)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or None
    except ValueError as e:
        raise errors.UserError(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2") from e
    protocol = REDUCED if args.reduced else FULL
    workdir = Path(args.workdir)
    if args.import_from:
        workdir.mkdir(parents=True, exist_ok=True)
        names = import_published(workdir, Path(args.import_from))
        _say(f"imported {len(names)} finished runs from {args.import_from}")
    if args.report:
        _check_protocol(workdir, protocol)
        write_report(workdir, protocol, families, seeds)
        status = {"stopped": None}
    else:
        status = run_families(families, workdir, protocol, seeds, hours=args.hours)
    if args.publish:
        publish(workdir, Path(args.publish))
    _say(f"tables: {workdir / 'ablations.md'}")
    return 0 if status["stopped"] is None or args.hours else 3


def import_published(workdir: Path, published: Path) -> list[str]:
    """Stores the runs of a published ablations.json (e.g. the committed docs/ablations/) as finished
    runs of `workdir` where it has none, so a table grows across machines without recomputing them.
    Refused when the published protocol is not this workdir's. Returns the run names imported."""
    if not published.is_file():
        raise errors.UserError(f"--import {published}: no such file (an ablations.json written by --publish)")
    try:
        data = json.loads(published.read_text())
        protocol, runs = data["protocol"], data["runs"]
    except (ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"--import {published}: not an ablations.json ({e})") from e
    _check_protocol(workdir, Protocol.from_json(protocol))
    imported = []
    for name, result in runs.items():
        path = workdir / "runs" / name / "result.json"
        if not path.is_file():
            _write_json(path, result)
            imported.append(name)
    for name, key in (("references.json", "references"), (REFERENCES_LLM, "references_llm")):
        if data.get(key) and not (workdir / name).is_file():
            _write_json(workdir / name, data[key])
    return imported


def publish(workdir: Path, out: Path) -> None:
    """The report files (not the checkpoints) into `out`, e.g. docs/ablations for a commit."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("ablations.md", "ablations.json", "protocol.json", "references.json", REFERENCES_LLM):
        if (workdir / name).is_file():
            shutil.copy2(workdir / name, out / name)
    if (workdir / "plots").is_dir():
        shutil.copytree(workdir / "plots", out / "plots", dirs_exist_ok=True)


if __name__ == "__main__":
    sys.exit(main())
