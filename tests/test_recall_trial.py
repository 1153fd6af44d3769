"""The recall trial: the naming task stripped to matching a query's context to a support's, in the
App.-B classification format, with the copying warm-ups recipe 5 chose between."""

from __future__ import annotations

import json

import numpy as np

from dediffusion_jax.fewshot import prompts
from projects.miniworld import llm, recall_trial


def test_recall_texts_repeat_a_supports_key_and_score_only_the_repeats_names():
    rng = np.random.default_rng(0)
    for key_words in (1, 2, 4):
        text, spans = recall_trial.recall_text(rng, key_words, ways=3, queries=5)
        lines = text.split(prompts.SHOT_SEPARATOR)
        assert len(lines) == 8 and len(spans) == 5
        name_of = {}
        for line in lines[:3]:
            key, name = line.removeprefix("Context: ").rsplit(" Classification: ", 1)
            assert len(key.replace(" ,", "").split()) == key_words
            name_of[key] = name
        assert len(set(name_of)) == 3 and len(set(name_of.values())) == 3
        for line, (a, b) in zip(lines[3:], spans):
            key, name = line.removeprefix("Context: ").rsplit(" Classification: ", 1)
            assert name_of[key] == name and text[a:b] == f" {name}"


def test_the_fixed_warmup_copies_from_a_fixed_distance():
    text, [(a, b)] = recall_trial.fixed_copy_text(np.random.default_rng(1))
    words = text.split(" ")
    assert len(words) == 2 * recall_trial.FIXED_WORDS
    assert words[:recall_trial.FIXED_WORDS] == words[recall_trial.FIXED_WORDS:]
    assert text[a:b].split() == words[recall_trial.FIXED_WORDS + 1:]


def test_a_short_trial_runs_from_the_committed_model_and_reports_chance(capsys):
    argv = ["--key-words", "2", "--warmup", "random", "--warmup-steps", "2", "--steps", "2", "--batch", "2",
            "--init", str(llm.DEFAULT_DIR)]
    assert recall_trial.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["chance"] == 0.5 and summary["warmup_steps"] == 2 and 0 <= summary["naming_acc_last_3"] <= 1
    assert recall_trial.main(["--ways", "0"]) == 2
