"""The world's CLIP-style tokenizer: loads through transformers, one token per world word, stable."""

import json

import numpy as np
import pytest

from projects.miniworld import captions as C
from projects.miniworld import scenes as S
from projects.miniworld import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


def test_committed_files_equal_a_fresh_build(tmp_path):
    a, b = T.build_tokenizer(tmp_path / "a"), T.build_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() == (T.DEFAULT_DIR / name).read_bytes()


def test_clip_vocabulary_layout():
    vocab = json.loads((T.DEFAULT_DIR / "vocab.json").read_text(encoding="utf-8"))
    inv = sorted(vocab, key=vocab.get)
    assert list(vocab.values()) == list(range(len(vocab)))
    base = list(T.bytes_to_unicode().values())
    assert inv[:256] == base and inv[256:512] == [b + "</w>" for b in base]
    assert inv[-2:] == [T.BOS, T.EOS]
    merges = (T.DEFAULT_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert inv[512:-2] == ["".join(m.split()) for m in merges[1:]]


def test_every_world_word_is_one_token(tok):
    ids = T.word_token_ids(tok)
    for w in C.WORLD_WORDS + T.DISTRACTORS + T.PUNCTUATION:
        enc = tok(w, add_special_tokens=False)["input_ids"]
        assert len(enc) == 1, (w, tok.convert_ids_to_tokens(enc))
        if w in ids:
            assert enc[0] == ids[w]
    punct = set(T.punctuation_token_ids(tok))
    assert tok(",", add_special_tokens=False)["input_ids"][0] in punct
    assert not punct & set(ids.values())
    assert tok.bos_token_id not in punct and tok.eos_token_id not in punct


def test_every_full_caption_round_trips_and_fits_the_context(tok):
    caps = [C.full_caption(s) for s in S.all_scenes()]
    ids = T.encode(tok, caps)
    assert ids.shape == (len(caps), 16)
    lengths = (ids != tok.eos_token_id).sum(1) + 1  # text + start + one end token
    assert lengths.max() <= 14
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert (ids[np.arange(len(caps)), lengths - 1] == tok.eos_token_id).all()
    decoded = tok.batch_decode(ids, skip_special_tokens=True)
    assert decoded == caps


def test_pads_to_sixteen_with_start_and_end(tok):
    ids = T.encode(tok, ["", "green circle"])
    assert tok.pad_token == T.EOS and tok.model_max_length == 16
    assert ids[0].tolist() == [tok.bos_token_id] + [tok.eos_token_id] * 15
    assert ids[1, 0] == tok.bos_token_id and (ids[1, 3:] == tok.eos_token_id).all()
    fast = T.load_tokenizer(fast=True)
    np.testing.assert_array_equal(T.encode(fast, ["green circle , white background"]),
                                  T.encode(tok, ["green circle , white background"]))
