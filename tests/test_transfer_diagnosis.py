"""The transfer diagnosis edits a run's own texts one way each; the edits are exact and checked."""

import pytest

from projects.miniworld import transfer_diagnosis as diag


def test_repeats_removed_keeps_each_word_once_in_its_first_place():
    text = "green triangle bottom bottom triangle green triangle bottom yellow gray gray gray"
    assert diag.remove_repeats(text) == "green triangle bottom yellow gray"
    assert diag.remove_repeats("") == ""


def test_edits_leave_the_texts_as_written_untouched_and_refuse_unknown_edits():
    texts = {3: "red red circle", 7: "blue square"}
    assert diag.edited(texts, "as written") == texts
    assert diag.edited(texts, "repeats removed") == {3: "red circle", 7: "blue square"}
    with pytest.raises(ValueError, match="unknown edit"):
        diag.edited(texts, "shuffled")


def test_repeat_statistics_count_words_distinct_words_and_texts_with_repeats():
    stats = diag.repeat_statistics(["red red circle", "blue square"])
    assert stats == {"words": 2.5, "distinct_words": 2.0, "texts_with_repeats": 0.5}


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    assert diag.main(["--run", str(tmp_path), "--workdir", str(tmp_path / "out")]) != 0
    assert "no train/ folder" in capsys.readouterr().err
