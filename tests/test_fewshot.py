"""The few-shot evaluation's parts, without a language model: the paper's prompt formats (App. B,
verbatim), scoring, support sampling, the answer cache, the report, and the command's user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dediffusion_jax.fewshot import prompts, report, run, scoring, support
from dediffusion_jax.fewshot.cache import AnswerCache, CachedLLM
from dediffusion_jax.fewshot.data import Item, Question

REPO = Path(__file__).resolve().parents[1]
PAPER = (REPO.parent / "shared" / "PAPER.md")


# ------------------------------------------------------------------------------------------ prompts


def test_vqa_line_is_the_papers_format_verbatim():
    line = prompts.vqa_line("<text>", "<q>", "<a>")
    assert line == "Answer the question given the context. Image context: <text> Image question: <q> Short answer: <a>$"
    if PAPER.exists():  # the same string as PAPER.md's App. B line
        assert f"`{line}`" in PAPER.read_text()


def test_caption_and_classification_lines_are_the_papers():
    assert prompts.caption_line("<text>", "<cap>") == \
        "MS COCO image captioning. Image context: <text> MS COCO image caption: <cap>$"
    assert prompts.classify_line("<text>", "lion", ["lion", "vase"]) == \
        'Classify the context into "lion" or "vase". Context: <text> Classification: lion.'
    assert prompts.classify_line("<text>", "lion") == "Context: <text> Classification: lion."
    assert prompts.induction(["a", "b", "c"]) == 'Classify the context into "a", "b" or "c".'


def test_a_k_shot_vqa_prompt_repeats_the_line_and_leaves_the_query_answer_empty():
    shots = [prompts.Shot("red circle", "red", "What colour?"), prompts.Shot("blue square", "square", "What shape?")]
    p = prompts.vqa_prompt("green triangle", "Is there a triangle?", shots)
    lines = p.split("\n")
    assert len(lines) == 3
    assert lines[0].endswith("Short answer: red$") and lines[1].endswith("Short answer: square$")
    assert lines[2] == ("Answer the question given the context. Image context: green triangle "
                        "Image question: Is there a triangle? Short answer:")


def test_zero_shot_pseudo_samples_keep_questions_and_answers_but_no_image_context():
    shots = prompts.pseudo_shots([prompts.Shot("red circle", "red", "What colour?")])
    p = prompts.vqa_prompt("blue square", "What shape?", shots)
    assert p.split("\n")[0] == ("Answer the question given the context. Image context: Image question: "
                                "What colour? Short answer: red$")
    assert "red circle" not in p


def test_classification_states_the_task_once_at_the_start():
    shots = [prompts.Shot("a lion", "dax"), prompts.Shot("a vase", "wug")]
    p = prompts.classify_prompt("another lion", shots, ["dax", "wug"])
    assert p.count("Classify the context into") == 1
    assert p.split("\n") == ['Classify the context into "dax" or "wug". Context: a lion Classification: dax.',
                             "Context: a vase Classification: wug.", "Context: another lion Classification:"]
    assert "Classify" not in prompts.classify_prompt("x", shots, None)


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("output, task, answer", [
    (" red$ Answer the question", "vqa", "red"), (" top left$", "vqa", "top left"),
    (" yes\nAnswer the", "vqa", "yes"), (" dax. Context: x", "classify", "dax"), ("red", "vqa", "red")])
def test_the_answer_is_the_output_before_the_end_mark(output, task, answer):
    assert scoring.answer_of(output, task) == answer


def test_normalisation_and_the_vqa_accuracy_metric():
    assert scoring.normalize("Two.") == "2" and scoring.normalize("the Red  circle") == "red circle"
    assert scoring.vqa_accuracy("red", ["red"]) == 1.0 and scoring.vqa_accuracy("blue", ["red"]) == 0.0
    # VQAv2: min(1, matches/3) averaged over the 10 leave-one-out subsets of 10 human answers
    assert scoring.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert scoring.vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert scoring.vqa_accuracy("two", ["2", "2", "2", "1"]) == pytest.approx(0.75)  # (3 * 2/3 + 1) / 4


def test_breakdown_per_question_type():
    b = scoring.breakdown([1, 0, 1, 1], ["colour", "colour", "count", "count"])
    assert b["all"] == {"accuracy": 0.75, "n": 4}
    assert b["colour"]["accuracy"] == 0.5 and b["count"]["accuracy"] == 1.0


# ------------------------------------------------------------------------------------------ support


def test_support_depends_only_on_seed_and_query():
    pool = list(range(100))
    a = support.sample_support(pool, 4, seed=0, key="q1")
    assert a == support.sample_support(pool, 4, seed=0, key="q1") and len(set(a)) == 4
    assert a != support.sample_support(pool, 4, seed=1, key="q1")
    assert a != support.sample_support(pool, 4, seed=0, key="q2")
    with pytest.raises(ValueError, match="support pool has 100"):
        support.sample_support(pool, 101, seed=0, key="q1")


def test_an_episode_has_the_query_class_and_n_minus_1_others_under_made_up_names():
    pool = {f"class{c}": [f"c{c}-{i}" for i in range(3)] for c in range(8)}
    ep = support.episode("class3", pool, ways=5, shots=2, seed=0, key="img7")
    classes = {item.split("-")[0] for item, _ in ep.support}
    assert len(ep.support) == 10 and len(classes) == 5 and "c3" in classes
    assert sorted(ep.names) == sorted({name for _, name in ep.support})
    assert all(name in support.MADE_UP_NAMES for name in ep.names)
    assert {name for item, name in ep.support if item.startswith("c3-")} == {ep.answer}


# ------------------------------------------------------------------------------- run, cache, report


class EchoModel:
    """Answers the first word of the query's context: right exactly when the context names the answer."""

    identity = "echo"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def complete(self, prompts_, *, max_tokens, stop):
        self.prompts += list(prompts_)
        out = []
        for p in prompts_:
            last = p.split("\n")[-1]
            ctx = last.split("Image context:")[1].split("Image question:")[0].split() if "Image context:" in last \
                else last.split("Context:")[1].split("Classification:")[0].split()
            out.append(f" {ctx[0] if ctx else 'nothing'}{stop[0]} trailing")
        return out


def test_evaluate_vqa_scores_each_source_and_shot_per_question_type():
    qs = [Question(f"q{i}", f"img{i}", "What colour?", (c,), "colour") for i, c in enumerate(["red", "blue"])]
    pool = [Question(f"t{i}", f"tr{i}", "What colour?", ("green",), "colour", "train") for i in range(5)]
    texts = {"img0": "red circle", "img1": "square blue", **{f"tr{i}": "green" for i in range(5)}}
    model = EchoModel()
    res = run.evaluate_vqa(model, qs, pool, {"words": texts}, run.VqaSettings(shots=(0, 2), pseudo_shots=1))
    assert res["sources"]["words"]["0"]["all"]["accuracy"] == 0.5   # "red" right, "square" wrong
    assert res["sources"]["words"]["2"]["colour"]["n"] == 2
    assert model.prompts[0].count("\n") == 1 and "Image context: Image question" in model.prompts[0]
    assert model.prompts[2].count("\n") == 2 and "Image context: green Image question" in model.prompts[2]
    table = report.accuracy_table(res["sources"])
    assert "| words | 50.0 | 50.0 |" in table and "0-shot" in table


def test_zero_shot_needs_texts_for_the_queries_only():
    qs = [Question("q0", "img0", "What colour?", ("red",), "colour")]
    pool = [Question(f"t{i}", f"tr{i}", "What colour?", ("green",), "colour", "train") for i in range(5)]
    model = EchoModel()
    res = run.evaluate_vqa(model, qs, pool, {"words": {"img0": "red circle"}}, run.VqaSettings(shots=(0,), pseudo_shots=2))
    assert res["sources"]["words"]["0"]["all"]["accuracy"] == 1.0
    assert model.prompts[0].count("Image context: Image question") == 2  # the pseudo samples, blank


class MatchModel:
    """Answers the name of the support line whose context equals the query's: right exactly when the
    episode named the query's class consistently."""

    identity = "match"

    def complete(self, prompts_, *, max_tokens, stop):
        out = []
        for p in prompts_:
            pairs = [line.split("Context:")[1].split("Classification:") for line in p.split("\n")]
            *shots, (query, _) = [(c.strip(), n.strip(" .")) for c, n in pairs]
            out.append(" " + dict(shots).get(query, "none") + ".")
        return out


def test_evaluate_classify_with_and_without_induction():
    pool = [Item(f"tr{c}{i}", f"c{c}", "train") for c in range(6) for i in range(2)]
    items = [Item(f"q{c}", f"c{c}") for c in range(6)]
    texts = {it.image_id: it.label for it in [*pool, *items]}   # a class's texts are all alike
    res = run.evaluate_classify(MatchModel(), items, pool, {"labels": texts},
                                run.ClassifySettings(ways=3, shots=(1,)))
    assert set(res["sources"]["labels"]) == {"3-way 1-shot, induction", "3-way 1-shot, no induction"}
    assert res["sources"]["labels"]["3-way 1-shot, induction"]["all"]["accuracy"] == 1.0
    blind = run.evaluate_classify(MatchModel(), items, pool, {"blank": {i: "" for i in texts}},
                                  run.ClassifySettings(ways=3, shots=(1,), induction=(False,)))
    assert blind["sources"]["blank"]["3-way 1-shot, no induction"]["all"]["accuracy"] < 1.0


def test_the_answer_cache_makes_a_rerun_free(tmp_path):
    model = EchoModel()
    cached = CachedLLM(model, AnswerCache(tmp_path / "answers.jsonl"))
    ps = ["Answer ... Image context: red Image question: q Short answer:"] * 2 + \
         ["Answer ... Image context: blue Image question: q Short answer:"]
    first = cached.complete(ps, max_tokens=4, stop=("$",))
    assert len(model.prompts) == 2   # the duplicate asked once
    again = CachedLLM(model, AnswerCache(tmp_path / "answers.jsonl")).complete(ps, max_tokens=4, stop=("$",))
    assert again == first and len(model.prompts) == 2
    CachedLLM(model, AnswerCache(tmp_path / "answers.jsonl")).complete(ps[:1], max_tokens=5, stop=("$",))
    assert len(model.prompts) == 3   # other generation settings: another key
    with open(tmp_path / "answers.jsonl", "a") as f:
        f.write('{"key": "torn')     # an interrupted write
    assert len(AnswerCache(tmp_path / "answers.jsonl").entries) == 3


# ----------------------------------------------------------------------------------- the command


def fewshot(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dediffusion_jax.fewshot", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_user_errors_are_one_line(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"id": "a", "text": "red"}\n')
    qs = tmp_path / "q.jsonl"
    qs.write_text('{"image_id": "b", "question": "What colour?", "answer": "red"}\n')
    cases = [
        (["--texts", str(texts), "--questions", str(tmp_path / "none.jsonl"), "--llm", str(tmp_path), "--out", str(tmp_path / "o")],
         "none.jsonl"),
        (["--texts", str(texts), "--questions", str(qs), "--llm", "not-a-model", "--out", str(tmp_path / "o"), "--shots", "0",
          "--pseudo-shots", "0"], "neither an http(s):// URL nor a model folder"),
        (["--texts", str(texts), "--questions", str(qs), "--llm", str(tmp_path), "--shots", "x", "--out", str(tmp_path / "o")],
         "--shots"),
        (["--texts", str(texts), "--questions", str(texts), "--llm", str(tmp_path), "--out", str(tmp_path / "o")],
         "texts.jsonl:1: a question needs"),
        (["--texts", str(texts), "--questions", str(qs), "--llm", str(tmp_path), "--out", str(tmp_path / "o"),
          "--shots", "0", "--pseudo-shots", "0"], "no config.json"),
    ]
    for argv, needle in cases:
        proc = fewshot(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_a_folder_with_only_pickle_weights_is_refused(tmp_path):
    from dediffusion_jax import errors
    from dediffusion_jax.fewshot.local_backend import weight_files

    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(errors.UserError, match=r"no \*.safetensors weights.*pytorch_model.bin"):
        weight_files(tmp_path)


def test_a_missing_text_is_named_with_its_source():
    """Checked before any model call."""
    from dediffusion_jax.fewshot.data import DataError, check_texts

    with pytest.raises(DataError, match="'mine' has no text for 1 image"):
        check_texts({"a": "x"}, {"a", "b"}, "mine")
