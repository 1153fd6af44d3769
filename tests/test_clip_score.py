"""CLIP score with the miniature world's tiny CLIP: matching captions beat shuffled ones; the
preprocessing equals transformers' CLIPImageProcessor; bad folders are one-line user errors."""

from __future__ import annotations

import numpy as np
import pytest

from dediffusion_jax.evaluation import clip_score
from projects.miniworld import captions, scenes

CLIP_DIR = "projects/miniworld/assets/backbone"
TOKENIZER_DIR = "projects/miniworld/assets/tokenizer"


@pytest.fixture(scope="module")
def scorer() -> clip_score.ClipScorer:
    return clip_score.ClipScorer(CLIP_DIR, TOKENIZER_DIR, batch_size=16, device="cpu")


def world(n: int) -> tuple[np.ndarray, list[str]]:
    idx = scenes.evaluation_indices(n)
    images = np.clip(np.round((scenes.images_of(idx) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return images, [captions.full_caption(scenes.scene_from_index(int(i))) for i in idx]


def test_own_captions_score_higher_than_shuffled_ones(scorer):
    images, texts = world(40)
    own = scorer.cosines(images, texts)
    shuffled = scorer.cosines(images, texts[7:] + texts[:7])
    assert own.shape == (40,) and np.all(np.abs(own) <= 1 + 1e-9)
    assert clip_score.clip_score(own) > clip_score.clip_score(shuffled) + 5.0
    # batching does not change the numbers
    np.testing.assert_allclose(own[:5], scorer.cosines(images[:5], texts[:5]), atol=1e-5)
    assert scorer.name.startswith("clip:")


def test_clip_score_is_100_times_the_clamped_mean_cosine():
    assert clip_score.clip_score([0.3, -0.2, 0.1]) == pytest.approx(100 * 0.4 / 3)
    assert np.isnan(clip_score.clip_score([]))


def test_preprocessing_equals_transformers_clip_image_processor():
    from transformers import CLIPImageProcessor

    import json
    from pathlib import Path

    config = json.loads((Path(CLIP_DIR) / clip_score.PREPROCESSOR).read_text())
    processor = CLIPImageProcessor.from_pretrained(CLIP_DIR)
    rng = np.random.default_rng(0)
    for shape in ((16, 16, 3), (24, 20, 3), (19, 33, 3)):  # as is; short side 20 -> 16 + crop
        x = rng.integers(0, 256, (2, *shape), np.uint8)
        want = processor(images=list(x), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(clip_score.preprocess(x, config), want, atol=1e-5)


def test_bad_clip_folders_are_user_errors(tmp_path):
    with pytest.raises(clip_score.ClipFolderError, match="missing config.json"):
        clip_score.ClipScorer(tmp_path)
    with pytest.raises(clip_score.ClipFolderError, match="--clip-tokenizer"):
        clip_score.ClipScorer(CLIP_DIR)  # the world's CLIP keeps its tokenizer elsewhere
