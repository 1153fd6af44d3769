"""A tiny tfds builder for tests: coco_captions-shaped examples generated locally, no download.

tfds needs builder classes in an importable module (not a test file's `__main__`), hence this file.
Build it with `build_tiny_captioned_images(data_dir)`; read it back with `TfdsSource`.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dediffusion_jax.data.local_tfds import LocalCodePath, prepare_array_record

NUM_EXAMPLES = {"train": 12, "validation": 5}


def tiny_image(i: int, size: tuple[int, int] = (20, 12)) -> Image.Image:
    """A deterministic small non-square RGB image, distinct per index."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


class TinyCaptionedImages(LocalCodePath, tfds.core.GeneratorBasedBuilder):
    """Like coco_captions: image, image/id, captions/text (2-3 per image), plus a label."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "test fixture"}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"),
                "image/id": tfds.features.Scalar(dtype=np.int64),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "label": tfds.features.ClassLabel(num_classes=3),
            }))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, n) for split, n in NUM_EXAMPLES.items()}

    def _generate_examples(self, split: str, n: int):
        offset = 0 if split == "train" else 1000
        for i in range(n):
            idx = offset + i
            captions = [{"text": f"picture {idx} caption {c}"} for c in range(2 + i % 2)]
            yield idx, {"image": tiny_image(idx), "image/id": idx, "captions": captions,
                        "label": i % 3}


def build_tiny_captioned_images(data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """Prepares the tiny dataset in array_record format under data_dir; returns the builder."""
    return prepare_array_record(TinyCaptionedImages, data_dir)
