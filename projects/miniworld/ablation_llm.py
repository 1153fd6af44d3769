"""The ablation tables' language-model column: world-LLM VQA accuracy of a run's texts (issue 20).

The paper pairs every ablation FID with a few-shot accuracy of a text-only LLM reading the texts. The
world's analogue: the recipe-1 world LLM (assets/llm_recipe1, trained on text only; the committed
model when the column was measured, kept as its LLM so every run's column is read by one model)
answers one question of each type about every REPORT-half scene of the ablation protocol, 0-shot with
pseudo samples, through the core command (`python -m dediffusion_jax.fewshot`), exactly as
docs/fewshot.md's table. Naming of scene kinds (the paper's 5-way 1-shot) is at chance for every
source with that LLM (docs/fewshot.md), so the column is VQA; the committed recipe-5 LLM (assets/llm)
names above chance, and moving the column to it is docs/fewshot.md's next step. The recipe-1 LLM
answers shape and presence from its prior (every source scores the same), so `informative` averages
the four types it reads from the context: background, colour, count, position.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SEED = 0
PSEUDO_SHOTS = 2
INFORMATIVE = ("background", "colour", "count", "position")


def vqa_accuracy(texts: Mapping[int, str], indices: Sequence[int], out: Path, *, name: str = "texts",
                 llm: str | None = None, seed: int = SEED) -> dict[str, Any]:
    """{"all", "informative", "by_type": {type: accuracy}, "n"}: 0-shot VQA of `texts` (scene -> text)
    on the scenes `indices` through the world LLM; answers are cached in `out`, so a rerun is free."""
    from dediffusion_jax.fewshot import data
    from dediffusion_jax.fewshot.__main__ import main as fewshot_main
    from projects.miniworld import fewshot_eval
    from projects.miniworld import llm as world_llm

    out.mkdir(parents=True, exist_ok=True)
    missing = [int(i) for i in indices if int(i) not in texts]
    if missing:
        raise ValueError(f"no text for {len(missing)} scene(s), e.g. {missing[:3]}")
    text_file = data.write_jsonl(out / "texts.jsonl", [{"id": str(int(i)), "text": texts[int(i)]} for i in indices])
    questions = data.write_jsonl(out / "questions.jsonl",
                                 [r for r in fewshot_eval.vqa_rows([int(i) for i in indices], seed)])
    code = fewshot_main(["--texts", f"{name}={text_file}", "--llm", str(llm or world_llm.RECIPE1_DIR),
                         "--questions", str(questions), "--shots", "0", "--pseudo-shots", str(PSEUDO_SHOTS),
                         "--seed", str(seed), "--out", str(out)])
    if code != 0:
        raise RuntimeError(f"the few-shot command ended with status {code} (see {out})")
    row = json.loads((out / "results.json").read_text())["sources"][name]["0"]
    by_type = {k: float(v["accuracy"]) for k, v in row.items() if k != "all"}
    return {"all": float(row["all"]["accuracy"]), "n": int(row["all"]["n"]), "by_type": by_type,
            "informative": sum(by_type[k] for k in INFORMATIVE) / len(INFORMATIVE)}


def run_texts(checkpoint: Path, indices: Sequence[int]) -> dict[int, str]:
    """A run's De-Diffusion texts of the scenes `indices` (its encoder's checkpoint)."""
    from dediffusion_jax.inference import TextEncoder
    from projects.miniworld import scenes

    encoder = TextEncoder.from_checkpoint(checkpoint, batch_size=len(indices))
    return dict(zip((int(i) for i in indices), encoder.texts(scenes.images_of(indices))))


def caption_vqa(indices: Sequence[int], out: Path) -> dict[str, dict[str, Any]]:
    """The caption references' column: {source: vqa_accuracy} for the short and the full caption."""
    from projects.miniworld import captions, scenes

    fns = {"short caption": captions.short_caption, "full caption (upper ref.)": captions.full_caption}
    return {name: vqa_accuracy({int(i): fn(scenes.scene_from_index(int(i))) for i in indices}, indices,
                               out / name.split(" (")[0].replace(" ", "_"), name=name)
            for name, fn in fns.items()}
