"""The two language-model backends on a real model, the committed world LLM: the local transformers
backend, and the OpenAI-compatible HTTP backend against a real server on localhost that serves the
same model (`dediffusion_jax.fewshot.serve`), with a timeout, 500 errors and retries injected by the
server. Both give the same answers; the command gives the same table through either, and a rerun is
answered from the cache."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dediffusion_jax import errors
from dediffusion_jax.fewshot import prompts, run
from dediffusion_jax.fewshot.__main__ import main as fewshot_main
from dediffusion_jax.fewshot.http_backend import HttpLLM, ServerError
from dediffusion_jax.fewshot.serve import HttpFault, make_server
from projects.miniworld import captions, fewshot_tasks, scenes
from projects.miniworld.llm import DEFAULT_DIR as WORLD_LLM

REPO = Path(__file__).resolve().parents[1]
STOP = prompts.stop_strings("vqa")


@pytest.fixture(scope="module")
def local():
    from dediffusion_jax.fewshot.local_backend import LocalLLM

    return LocalLLM(WORLD_LLM, device="cpu", batch_size=16)


class Faults:
    """What the server does before answering: a list of actions consumed one per request."""

    def __init__(self) -> None:
        self.plan: list[str] = []
        self.seen = 0

    def __call__(self, path: str, payload: dict) -> None:
        self.seen += 1
        action = self.plan.pop(0) if self.plan else "ok"
        if action == "slow":
            time.sleep(1.5)
        elif action.isdigit():
            raise HttpFault(int(action))


@pytest.fixture(scope="module")
def server(local):
    faults = Faults()
    srv = make_server(local, "127.0.0.1", 0, model_name="world-llm", before_request=faults)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", faults
    srv.shutdown()
    srv.server_close()


def world_prompts(n: int = 24) -> list[str]:
    """0-shot VQA prompts on held-out scenes, full captions as the context (pseudo samples from train)."""
    rng = np.random.default_rng(0)
    out = []
    for i in scenes.evaluation_indices(n):
        scene = scenes.scene_from_index(int(i))
        _, q, _ = fewshot_tasks.random_question(scene, rng)
        pseudo = [prompts.Shot("", "red", "What colour is the circle?")]
        out.append(prompts.vqa_prompt(captions.full_caption(scene), q, pseudo))
    return out


def test_local_backend_answers_world_questions_and_batching_changes_nothing(local):
    ps = world_prompts(12)
    batched = local.complete(ps, max_tokens=8, stop=STOP)
    assert all(a and "$" not in a and "\n" not in a for a in batched), batched
    local.batch_size = 1
    try:
        assert local.complete(ps, max_tokens=8, stop=STOP) == batched
    finally:
        local.batch_size = 16


def test_http_backend_gives_the_local_backends_answers(local, server):
    url, _ = server
    ps = world_prompts(24)
    http = HttpLLM(url, concurrency=4, timeout=30)
    assert http.model == "world-llm"            # from GET /models
    assert http.complete(ps, max_tokens=8, stop=STOP) == local.complete(ps, max_tokens=8, stop=STOP)
    chat = HttpLLM(url, api="chat", timeout=30)
    assert chat.complete(ps[:3], max_tokens=8, stop=STOP) == local.complete(ps[:3], max_tokens=8, stop=STOP)


def test_http_backend_retries_a_timeout_and_500s(local, server):
    url, faults = server
    ps = world_prompts(2)[:1]
    expected = local.complete(ps, max_tokens=8, stop=STOP)
    http = HttpLLM(url, model="world-llm", timeout=0.5, retries=3, concurrency=1, backoff=0.01)
    faults.plan = ["slow", "500", "503"]
    assert http.complete(ps, max_tokens=8, stop=STOP) == expected
    assert http.retried == 3 and http.requests == 4


def test_http_backend_gives_up_after_its_retries_and_never_retries_a_bad_request(server):
    url, faults = server
    http = HttpLLM(url, model="world-llm", timeout=5, retries=1, concurrency=1, backoff=0.01)
    faults.plan = ["500", "500"]
    with pytest.raises(ServerError, match=r"no answer after 2 tries \(HTTP 500"):
        http.complete(["x"], max_tokens=2, stop=STOP)
    faults.plan = ["400"]
    with pytest.raises(ServerError, match="HTTP 400") as e:
        http.complete(["x"], max_tokens=2, stop=STOP)
    assert http.requests == 3 and isinstance(e.value, errors.UserError) and e.value.exit_code == 3


def test_a_dead_server_is_one_error_line_with_exit_3(tmp_path):
    texts, questions = write_world_files(tmp_path, 2)
    proc = subprocess.run([sys.executable, "-m", "dediffusion_jax.fewshot", "--texts", str(texts), "--questions",
                           str(questions), "--llm", "http://127.0.0.1:9/v1", "--llm-model", "m", "--retries", "1",
                           "--timeout", "2", "--shots", "0", "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: http://127.0.0.1:9/v1/completions: no answer after 2 tries")


def write_world_files(folder: Path, n_scenes: int) -> tuple[Path, Path]:
    """Full-caption texts of every scene and VQA questions (eval: held-out, train: 40 train scenes)."""
    from dediffusion_jax.fewshot import data
    from projects.miniworld.fewshot_eval import vqa_rows

    texts = data.write_jsonl(folder / "full.jsonl", [{"id": str(i), "text": captions.full_caption(s)}
                                                      for i, s in enumerate(scenes.all_scenes())])
    rows = vqa_rows([int(i) for i in scenes.evaluation_indices(n_scenes)], seed=0)
    rows = [r for r in rows if r["split"] == "eval"] + [r for r in rows if r["split"] == "train"][:40]
    return texts, data.write_jsonl(folder / "questions.jsonl", rows)


def test_the_command_gives_one_table_through_either_backend_and_a_rerun_is_free(tmp_path, server, capsys):
    url, faults = server
    texts, questions = write_world_files(tmp_path, 4)
    common = ["--texts", f"full caption={texts}", "--blank", "--questions", str(questions), "--shots", "0,2"]
    assert fewshot_main([*common, "--llm", url, "--concurrency", "4", "--out", str(tmp_path / "http")]) == 0
    assert fewshot_main([*common, "--llm", str(WORLD_LLM), "--out", str(tmp_path / "local")]) == 0
    http = json.loads((tmp_path / "http" / "results.json").read_text())
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    assert http["sources"] == local["sources"]
    assert set(http["sources"]) == {"full caption", "blank (no image context)"}
    assert set(http["sources"]["full caption"]) == {"0", "2"}
    table = (tmp_path / "http" / "results.md").read_text()
    assert "| full caption |" in table and "| text source (0-shot) | all | background | colour | count |" in table
    before = faults.seen
    assert fewshot_main([*common, "--llm", url, "--out", str(tmp_path / "http")]) == 0
    again = json.loads((tmp_path / "http" / "results.json").read_text())
    assert faults.seen == before and again["cache"]["misses"] == 0 and again["sources"] == http["sources"]
    n = 2 * 2 * local["questions"]
    assert again["cache"]["hits"] == n


def test_full_captions_beat_the_blank_query_on_the_world_llm(local):
    """The world LLM reads its context: with the full caption it answers held-out questions far
    better than its prior (the blank query)."""
    from dediffusion_jax.fewshot.data import Question
    from projects.miniworld.fewshot_eval import vqa_rows

    rows = vqa_rows([int(i) for i in scenes.evaluation_indices(16)], seed=0)
    questions = [Question(r["question_id"], r["image_id"], r["question"], (r["answer"],), r["question_type"],
                          r["split"]) for r in rows]
    evals = [q for q in questions if q.split == "eval"]
    pool = [q for q in questions if q.split == "train"]
    full = {str(i): captions.full_caption(s) for i, s in enumerate(scenes.all_scenes())}
    blank = {i: "" for i in full}
    res = run.evaluate_vqa(local, evals, pool, {"full": full, "blank": blank}, run.VqaSettings(shots=(0,)))
    full_acc = res["sources"]["full"]["0"]["all"]["accuracy"]
    blank_acc = res["sources"]["blank"]["0"]["all"]["accuracy"]
    # measured on the tune half (1,074 questions): 0.679 vs 0.414
    assert full_acc >= blank_acc + 0.15, (full_acc, blank_acc)


def test_naming_diagnosis_redraws_the_core_commands_episodes(tmp_path):
    """names.json: accuracy and the share of answers among the episode's names, from the episodes the
    core command drew (the right name is always inside; a name drawn from outside is counted out)."""
    from dediffusion_jax.fewshot import data, support
    from projects.miniworld.fewshot_eval import kind_rows, naming_diagnosis

    rows = kind_rows([int(i) for i in scenes.evaluation_indices(12)])
    data.write_jsonl(tmp_path / "kinds.jsonl", rows)
    items = data.read_items(tmp_path / "kinds.jsonl")
    pool, evals = [r for r in items if r.split == "train"], [r for r in items if r.split != "train"]
    prompts_, right = run.classify_prompts(evals, pool, {r.image_id: "" for r in items}, 1, True,
                                           run.ClassifySettings(ways=5, seed=0))
    outside = [next(n for n in support.MADE_UP_NAMES if f'"{n}"' not in p) for p in prompts_]
    preds = [{"source": "s", "setting": "5-way 1-shot, induction", "image_id": it.image_id, "label": it.label,
              "prediction": r if j % 2 else o, "answer": r, "score": float(j % 2)}
             for j, (it, r, o) in enumerate(zip(evals, right, outside))]
    (tmp_path / "classify").mkdir()
    data.write_jsonl(tmp_path / "classify" / "predictions.jsonl", preds)
    table = naming_diagnosis(tmp_path, 5, 0)
    by_kinds: dict[str, list[float]] = {}
    for p in preds:
        by_kinds.setdefault("2" if " + " in p["label"] else "1", []).append(p["score"])
    assert set(by_kinds) == {"1", "2"}   # both kinds of query in the 12 scenes
    cell = table["s"]["5-way 1-shot, induction"]
    assert (cell["accuracy"], cell["in_episode"]) == (50.0, 50.0)
    assert cell["by_object_kinds"] == {k: {"accuracy": round(100 * sum(v) / len(v), 1), "queries": len(v)}
                                       for k, v in by_kinds.items()}
    names_md = (tmp_path / "classify" / "names.md").read_text()
    assert names_md.count("50.0 / 50.0") == 1 and "| s | 5-way 1-shot, induction |" in names_md
