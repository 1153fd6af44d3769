"""The decoder probe: the committed world decoder reads its captions (teacher-forced, no sampling)."""

from __future__ import annotations

import pytest

from projects.miniworld import probe, scenes
from dediffusion_jax.t2i.folder import load_decoder


def test_the_committed_decoder_gains_from_the_background_and_more_from_the_full_caption():
    decoder = load_decoder(probe.DEFAULT_DECODER)
    indices = scenes.split_indices("heldout")[:32]
    texts = {k: probe.PROBE_TEXTS[k] for k in ("empty", "background phrase", "full caption")}
    loss = probe.probe(decoder, indices, texts, draws=4)
    assert loss["full caption"] < loss["background phrase"] < loss["empty"]


def test_cli_prints_a_row_per_text(capsys):
    assert probe.main(["--scenes", "4", "--draws", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") == len(probe.PROBE_TEXTS) + 1  # rows + the separator line


def test_position_swapped_texts_exchange_only_those_words():
    scene = scenes.scene_from_index(int(scenes.split_indices("heldout")[0]))
    full = probe.PROBE_TEXTS["full caption"](scene).split()
    swapped = probe.PROBE_TEXTS["full, left/right swapped"](scene).split()
    exchange = {"left": "right", "right": "left"}
    assert swapped == [exchange.get(w, w) for w in full] and swapped != full


def test_text_matters_more_at_high_noise():
    """At a fixed high t the full caption lowers the loss far more than at a low t (docs: Timesteps)."""
    decoder = load_decoder(probe.DEFAULT_DECODER)
    indices = scenes.evaluation_indices(16)
    texts = {k: probe.PROBE_TEXTS[k] for k in ("empty", "full caption")}
    gain = {}
    for t in (100, 800):
        loss = probe.probe(decoder, indices, texts, draws=2, timestep=t)
        gain[t] = loss["empty"] - loss["full caption"]
    assert gain[800] > 0.01 and gain[800] > 5 * abs(gain[100])


def test_state_contrast_moves_nothing_before_the_swapped_word_and_something_at_it(capsys):
    """CLIP's causal mask: a swap cannot move the states before the swapped word. (What the figures
    say about the committed decoder is in docs/miniworld.md, "What still fails: left and right".)"""
    decoder = load_decoder(probe.DEFAULT_DECODER)
    caption = probe.CONTRAST_CAPTION
    col = probe.state_contrast(decoder, caption, "left", "right")
    row = probe.state_contrast(decoder, caption, "top", "bottom")
    at_col, at_row = caption.split().index("left") + 1, caption.split().index("top") + 1  # +1: <sos>
    assert max(col[:at_col]) == 0.0 and max(row[:at_row]) == 0.0
    assert col[at_col] > 0 and row[at_row] > 0
    with pytest.raises(ValueError, match="is not a word"):
        probe.state_contrast(decoder, caption, "dog", "cat")
    assert probe.main(["--contrast"]) == 0
    assert "| left -> right | 0.000 |" in capsys.readouterr().out


@pytest.mark.slow  # about 48 s on 2 cores: .ci/run's slow phase keeps the default run under 20 min
def test_straight_through_ranks_are_ranks_of_the_encoder_vocabulary(capsys):
    decoder = load_decoder(probe.DEFAULT_DECODER)
    ranks = probe.straight_through_ranks(decoder, scenes.evaluation_indices(4), num_tokens=6, draws=1)
    assert set(ranks) == {"background", "colour", "shape", "absent colour", "absent shape", "chance"}
    assert all(0.0 <= v <= 2 * ranks["chance"] for v in ranks.values())
    assert probe.main(["--st-ranks", "--scenes", "2", "--draws", "1", "--context", "colours",
                       "--t-range", "500", "900"]) == 0
    assert "colours context, t in [500, 900)" in capsys.readouterr().out
    # Per word: every word of the 31 has a mean rank, and they are ranks of 31 words (mean 15.0).
    per_word = probe.straight_through_ranks(decoder, scenes.evaluation_indices(4), num_tokens=6, draws=1,
                                            per_word=True)
    words = {k: v for k, v in per_word.items() if k.startswith("word ")}
    assert len(words) == 31 and abs(sum(words.values()) / 31 - per_word["chance"]) < 1e-6
    assert probe.main(["--st-ranks", "--scenes", "2", "--draws", "1", "--per-word"]) == 0
    assert "per word, most favoured first: " in capsys.readouterr().out
    with pytest.raises(ValueError, match="context"):
        probe.straight_through_ranks(decoder, [0], context="grammar")


def test_colours_context_repeats_the_background_and_object_colours():
    scene = scenes.Scene("white", (scenes.SceneObject("red", "circle", 0, 0),
                                   scenes.SceneObject("blue", "square", 1, 1)))
    assert probe._context_words(scene, 5) == ["white", "red", "blue", "white", "red"]


def test_shape_texts_are_bags_of_the_scenes_words():
    scene = scenes.Scene("gray", (scenes.SceneObject("green", "triangle", 1, 0),))
    texts = {name: fn(scene) for name, fn in probe.SHAPE_TEXTS.items()}
    assert texts["colours + background"] == "green gray"
    assert texts["colour shape + background"] == "green triangle gray"
    assert texts["colour WRONG shape + background"] == "green circle gray"
    assert texts["colour shape row + background"] == "green triangle bottom gray"


def test_the_committed_decoder_rewards_right_shape_words_even_without_positions():
    decoder = load_decoder(probe.DEFAULT_DECODER)
    texts = {k: probe.SHAPE_TEXTS[k] for k in
             ("colours + background", "colour shape + background", "colour WRONG shape + background")}
    loss = probe.probe(decoder, scenes.evaluation_indices(32), texts, draws=2, timestep=700)
    assert (loss["colour shape + background"] < loss["colours + background"]
            < loss["colour WRONG shape + background"]), loss


def test_slot_mass_needs_a_training_run(capsys):
    with pytest.raises(SystemExit):
        probe.main(["--slot-mass", "--scenes", "2"])
    assert "--slot-mass needs --workdir" in capsys.readouterr().err
