"""The decoder probe: the committed world decoder reads its captions (teacher-forced, no sampling)."""

from __future__ import annotations

from dediffusion_jax.miniworld import probe, scenes
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
