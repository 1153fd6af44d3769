"""The world LLM: trained on text only, in the paper's prompt formats, on train scenes only; resumable;
the committed folder records its command, seed and wall time and loads through transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dediffusion_jax.fewshot import prompts
from projects.miniworld import captions, fewshot_tasks, llm, scenes


@pytest.mark.parametrize("recipe", llm.RECIPES)
def test_training_text_is_app_b_prompts_about_train_scenes_only(monkeypatch, recipe):
    described = []
    real_context, real_scene = llm._context, llm._train_scene
    monkeypatch.setattr(llm, "_context", lambda i, rng, clean=False, recipe=2: described.append(i)
                        or real_context(i, rng, clean, recipe))
    monkeypatch.setattr(llm, "_train_scene", lambda rng: described.append(real_scene(rng)) or described[-1])
    rng = np.random.default_rng(0)
    for n in range(300):
        text, spans = llm.example(rng, simple=n < 40, lookup=n < 20 and recipe == 2, recipe=recipe)
        if llm.task_of(text) == "copying":   # recipe 5's copying texts describe no scene
            continue
        assert spans and all(text[a:b].startswith(" ") for a, b in spans)
        for line in text.split(prompts.SHOT_SEPARATOR):
            assert line.startswith((prompts.VQA_INSTRUCTION + " Image context:", "Context:", "Classify the context into"))
            assert line.endswith(("$", ".")), line
    assert len(described) > 500
    assert not scenes.held_out_mask()[np.array(described)].any()   # every scene described is a train scene


def test_every_question_type_has_one_right_answer():
    rng = np.random.default_rng(1)
    for i in scenes.evaluation_indices(50):
        scene = scenes.scene_from_index(int(i))
        for qtype in fewshot_tasks.QUESTION_TYPES:
            qa = fewshot_tasks.question(scene, qtype, rng)
            if qa is None:
                assert qtype == "position" and len({(o.colour, o.shape) for o in scene.objects}) == 1
                continue
            q, a = qa
            if qtype == "colour":
                assert a in scenes.COLOURS and a in captions.full_caption(scene)
            elif qtype == "count":
                assert a == str(len(scene.objects))
            elif qtype == "position":
                c, s = q.removeprefix("Where is the ").rstrip("?").split()
                assert f"{c} {s} {a}" in captions.full_caption(scene)


def test_recipe_2_names_episodes_by_copying_and_logs_each_task(tmp_path):
    """Recipe 2's naming texts: every answered name is one of the episode's support names; the
    metrics log the answer accuracy of naming and VQA texts apart."""
    rng = np.random.default_rng(2)
    for n in range(40):
        text, spans = llm.classify_example(rng, simple=n % 2 == 0)
        support_names = {line.rsplit(" ", 1)[1] for line in text.split("\n")[:-len(spans)]}
        assert {text[a:b] for a, b in spans} <= {f" {s}" for s in support_names}
    workdir = _run(tmp_path, "r2", "--recipe", "2", "--lookup-steps", "1", "--simple-steps", "2")
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"naming_acc", "vqa_acc"} <= set(last)
    assert json.loads((workdir / "out" / "TRAINING.json").read_text())["recipe"] == 2


def test_recipe_3_copy_episodes_repeat_a_supports_description_word_for_word():
    """Recipe 3's first naming phase: each query line is a support's line, name included."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        text, spans = llm.classify_example(rng, copy=True)
        lines = text.split(prompts.SHOT_SEPARATOR)
        support, queries = lines[:-len(spans)], lines[-len(spans):]
        assert len(spans) == llm.QUERIES
        bare = {line.split("Context:", 1)[1] for line in support}
        assert all(q.split("Context:", 1)[1] in bare for q in queries)
    phases = llm.DEFAULTS[3]  # look-ups, then copying, then naming other scenes, then the mix
    assert phases["lookup_steps"] < phases["simple_steps"] < phases["steps"]


def test_recipe_4_starts_naming_from_the_kinds_object_words_and_replays_vqa(tmp_path):
    """Recipe 4's first phase: a query's context is the object words of its kind, the same words as
    the support that carries its name; later phases add full captions and the context mix; a share
    of every step is recipe 1's VQA. It starts from a trained model (--init), which it requires."""
    rng = np.random.default_rng(4)
    naming = 0
    for _ in range(60):
        text, spans = llm.example(rng, simple=True, lookup=True, naming_share=0.75, recipe=4)
        if not llm.is_naming(text):
            assert text.startswith(prompts.VQA_INSTRUCTION)
            continue
        naming += 1
        lines = text.split(prompts.SHOT_SEPARATOR)
        context_of = {}
        for line in lines[:-len(spans)]:
            context, name = line.split("Context: ", 1)[1].rsplit(" Classification: ", 1)
            context_of[name.rstrip(".")] = context
            assert set(context.replace(",", " ").split()) <= set(scenes.COLOURS + scenes.SHAPES)
        for line in lines[-len(spans):]:
            context, name = line.split("Context: ", 1)[1].rsplit(" Classification: ", 1)
            assert context_of[name.rstrip(".")] == context
    assert 30 <= naming <= 55
    later = [llm.example(rng, naming_share=1.0, recipe=4)[0] for _ in range(20)]
    assert any(captions.BACKGROUND_WORD in t for t in later)   # full captions and the mix
    assert llm.main(["--workdir", str(tmp_path / "no_init"), "--recipe", "4"]) == 2   # --init is required
    workdir = _run(tmp_path, "r4", "--recipe", "4", "--init", str(llm.RECIPE1_DIR), "--lookup-steps", "1",
                   "--simple-steps", "2")
    record = json.loads((workdir / "out" / "TRAINING.json").read_text())
    assert record["recipe"] == 4 and record["init"] == str(llm.RECIPE1_DIR) and record["lm_weight"] == 0.0


def test_recipe_5_warms_up_on_copying_texts_whose_recurrence_has_no_fixed_place(tmp_path):
    """Recipe 5: a warm-up of texts in which a segment of words recurs at a random distance (the loss
    reads the recurrence: only matching what came before predicts it), then recipe 4's texts with a
    share of such texts kept."""
    rng = np.random.default_rng(5)
    distances = set()
    for _ in range(50):
        text, [(start, end)] = llm.copying_example(rng)
        words = text.split(" ")
        assert len(words) == llm.INDUCT_WORDS and llm.task_of(text) == "copying"
        before = text[:start].split(" ")
        recurrence = text[start:end].split(" ")[1:]              # the span starts with its space
        assert llm.INDUCT_SEGMENT[0] - 1 <= len(recurrence) <= llm.INDUCT_SEGMENT[1] - 1
        segment = [before[-1], *recurrence]                       # the recurrence's first word is not scored
        first = next(i for i in range(len(before) - len(segment))
                     if words[i:i + len(segment)] == segment)
        distances.add(len(before) - 1 - first)
    assert len(distances) > 20                                    # no fixed offset to learn instead
    assert all(llm.task_of(llm.example(rng, recipe=5, induct=True)[0]) == "copying" for _ in range(20))
    tasks = [llm.task_of(llm.example(rng, naming_share=0.75, recipe=5)[0]) for _ in range(400)]
    assert 15 <= tasks.count("copying") <= 70 and tasks.count("naming") > 200
    assert llm.main(["--workdir", str(tmp_path / "bad"), "--recipe", "4", "--init", str(llm.RECIPE1_DIR),
                     "--induct-steps", "3"]) == 2                 # the warm-up is recipe 5's
    workdir = _run(tmp_path, "r5", "--recipe", "5", "--init", str(llm.RECIPE1_DIR), "--induct-steps", "2",
                   "--lookup-steps", "3", "--simple-steps", "3", "--save-every", "2")
    record = json.loads((workdir / "out" / "TRAINING.json").read_text())
    assert record["recipe"] == 5 and record["induct_steps"] == 2
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert "copying_acc" in logged[0]


def _run(tmp_path, name, *extra):
    workdir = tmp_path / name
    argv = ["--workdir", str(workdir), "--out", str(workdir / "out"), "--steps", "4", "--batch", "2",
            "--save-every", "1", *extra]
    assert llm.main(argv) == 0
    return workdir


def test_a_resumed_run_ends_with_the_same_weights(tmp_path):
    from safetensors.numpy import load_file

    straight = _run(tmp_path, "straight")
    _run(tmp_path, "resumed", "--stop-after-steps", "2")
    assert not (tmp_path / "resumed" / "out").exists()
    resumed = _run(tmp_path, "resumed")
    a = load_file(str(straight / "out" / "model.safetensors"))
    b = load_file(str(resumed / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert llm.main(["--workdir", str(tmp_path / "resumed"), "--steps", "5", "--batch", "2"]) == 2  # other args


@pytest.mark.parametrize("folder", [llm.DEFAULT_DIR, llm.RECIPE1_DIR], ids=["recipe5", "recipe1"])
def test_the_committed_world_llms_are_small_float16_transformers_folders(folder):
    """The committed world LLM (recipe 5) and its init (recipe 1, the ablation column's LLM)."""
    from safetensors import safe_open

    record = json.loads((folder / "TRAINING.json").read_text())
    assert record["command"].startswith("python -m projects.miniworld.llm")
    if folder == llm.DEFAULT_DIR:
        assert record["recipe"] == 5 and record["init_moved_to"] == "projects/miniworld/assets/llm_recipe1"
    assert record["seed"] == 0 and record["wall_seconds"] > 0 and record["steps"] > 0
    assert (folder / "model.safetensors").stat().st_size < 5_000_000
    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"float16"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    assert model.config.model_type == "llama"
    assert tok.decode(tok("of yellow bottom of circle blue dog$")["input_ids"]) == "of yellow bottom of circle blue dog$"


@pytest.mark.parametrize("words", ["small dog photo", "circle circle circle left"])
def test_the_tokenizer_encodes_de_diffusion_style_text_without_unknowns(words):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llm.DEFAULT_DIR), local_files_only=True)
    ids = tok(words)["input_ids"]
    assert tok.unk_token_id not in ids or tok.unk_token_id == tok.eos_token_id
    assert tok.decode(ids) == words
