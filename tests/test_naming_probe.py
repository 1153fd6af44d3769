"""The naming probe: 5-way 1-shot episodes of train scenes, scored by the query's number of object kinds."""

import json

import numpy as np

from dediffusion_jax.fewshot import prompts
from projects.miniworld import llm, naming_probe


def test_episodes_end_with_a_query_whose_answer_is_a_support_name_and_count_its_object_kinds():
    rng = np.random.default_rng(0)
    seen = set()
    for context in naming_probe.CONTEXTS:
        for _ in range(30):
            text, spans, kinds = naming_probe.episode(rng, context)
            lines = text.split(prompts.SHOT_SEPARATOR)
            assert len(lines) == 6 and len(spans) == 1          # 5 supports, 1 query
            query = lines[-1].split("Context: ", 1)[1]
            names = [line.rsplit(" ", 1)[1].rstrip(".") for line in lines[:-1]]
            assert text[spans[0][0]:spans[0][1]].strip().rstrip(".") in names
            if context == "kind":   # the kind's object words: one segment per object kind
                assert kinds == query.split(" Classification")[0].count(" , ") + 1
            seen.add(kinds)
    assert seen == {1, 2}


def test_the_command_prints_accuracies_per_context_and_object_kinds(capsys):
    assert naming_probe.main(["--llm", str(llm.DEFAULT_DIR), "--episodes", "6"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for context in naming_probe.CONTEXTS:
        cells = out["accuracy"][context]
        assert sum(c["queries"] for c in cells.values()) == 6
        assert all(0.0 <= c["accuracy"] <= 100.0 for c in cells.values())
    assert naming_probe.main(["--llm", "/nonexistent", "--episodes", "2"]) == 2
