"""The miniature world as a tfds dataset (`mini_world`), in array_record format.

Why: `miniworld:SPLIT` renders scenes on the fly through a source of its own (projects/miniworld/data_source.py).
This builder writes the same scenes as an ordinary coco_captions-shaped tfds dataset, so the world also
runs through the STANDARD data path (`TfdsSource` -> `Preprocessor`) that real datasets take: a
De-Diffusion run on the world then exercises the code a COCO or LAION run uses, and the dataset can be
copied to another machine like any prepared tfds dataset.

Build (nothing is downloaded; about 20 s and 7 MB at the default size on 2 cores):

    python -m projects.miniworld.tfds_builder --data_dir DIR [--num_train N]

and train on it with `--config projects/miniworld/configs/world.py:data=DIR` (source `tfds:mini_world:train@DIR`).

Features: "image" (16x16x3 uint8 PNG, the scene's pixels: `t2i.pipeline.to_uint8` of the [-1, 1]
render, so `x / 127.5 - 1` is the render to within 0.5/127.5), "image/id" (the scene index),
"captions/text" ([full caption, short caption]), "background" (class label) and "num_objects".
Splits, both written in order (no tfds shuffling; the pipeline shuffles):
  train:   `num_train` draws (default 16,384) from the generative distribution over the train scenes,
           item i = `MiniWorldSource("train", size=num_train, seed=0)[i]` (same rng convention);
  heldout: every held-out scene exactly once, in index order.
`num_train` is a constructor argument (`MiniWorld(data_dir=..., num_train=64)` in tests); it is not
part of the prepared directory's name, so `build_mini_world` refuses to reuse a directory prepared
with another `num_train`.
"""

from __future__ import annotations

import argparse
import os
import sys

from dediffusion_jax.cli_flags import answer_help_early
from dediffusion_jax import errors

DEFAULT_NUM_TRAIN = 16384


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build the mini_world tfds dataset (array_record).")
    p.add_argument("--data_dir", required=True, help="tfds data_dir to write into")
    p.add_argument("--num_train", type=int, default=DEFAULT_NUM_TRAIN,
                   help=f"train split size (default {DEFAULT_NUM_TRAIN})")
    p.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return p


if __name__ == "__main__":
    answer_help_early(build_parser)  # before the heavy imports below

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dediffusion_jax.data.local_tfds import LocalCodePath, prepare_array_record
from projects.miniworld import captions, scenes
from dediffusion_jax.t2i.pipeline import to_uint8

SEED = 0  # MiniWorldSource's default seed: train item i is its item i


def train_indices(num_train: int, seed: int = SEED) -> np.ndarray:
    """Scene indices of the train split, as MiniWorldSource draws them (a prefix of any longer draw)."""
    return scenes.sample_indices(np.random.default_rng([seed, 7]), num_train, "train")


def split_scene_indices(split: str, num_train: int = DEFAULT_NUM_TRAIN) -> np.ndarray:
    """Scene index of every example of a split of the dataset, in stored order."""
    if split == "train":
        return train_indices(num_train)
    if split == "heldout":
        return scenes.split_indices("heldout")
    raise ValueError(f"mini_world has splits train and heldout, not {split!r}")


# Run as `python -m`, this file is also `__main__`: that copy is not registered (tfds refuses a second
# `mini_world`, and cannot locate a builder living in `__main__`); the CLI uses the imported module's.
class MiniWorld(LocalCodePath, tfds.core.GeneratorBasedBuilder,
                skip_registration=__name__ == "__main__"):
    """The miniature world's scenes with their full and short captions (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train (generative draws over train scenes) and heldout splits"}

    def __init__(self, *, num_train: int = DEFAULT_NUM_TRAIN, **kwargs):
        if int(num_train) < 1:
            raise ValueError(f"num_train must be positive, got {num_train}")
        self.num_train = int(num_train)
        super().__init__(**kwargs)
        self._original_state["num_train"] = self.num_train  # tfds re-creates builders from this

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(
                    shape=(scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), encoding_format="png"),
                "image/id": tfds.features.Scalar(dtype=np.int64),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "background": tfds.features.ClassLabel(names=scenes.BACKGROUNDS),
                "num_objects": tfds.features.Scalar(dtype=np.int64),
            }),
            disable_shuffling=True,  # keys are positions: stored order = generation order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split_scene_indices(split, self.num_train))
                for split in ("train", "heldout")}

    def _generate_examples(self, indices: np.ndarray):
        images = to_uint8(scenes.images_of(indices))
        for position, (i, image) in enumerate(zip(indices.tolist(), images)):
            scene = scenes.scene_from_index(i)
            yield position, {
                "image": Image.fromarray(image),  # PIL: tfds encodes numpy images with TensorFlow
                "image/id": i,
                "captions": [{"text": captions.full_caption(scene)},
                             {"text": captions.short_caption(scene)}],
                "background": scene.background,
                "num_objects": len(scene.objects),
            }


def build_mini_world(data_dir: str | os.PathLike, num_train: int = DEFAULT_NUM_TRAIN
                     ) -> tfds.core.DatasetBuilder:
    """Prepares mini_world in array_record format under data_dir (no-op if already there); returns
    the builder. Raises ValueError if data_dir holds a mini_world built with another num_train."""
    builder = prepare_array_record(MiniWorld, data_dir, num_train=num_train)
    stored = builder.info.splits["train"].num_examples
    if stored != num_train:
        raise ValueError(f"{builder.data_dir} was prepared with num_train={stored}, not {num_train}; "
                         "use another data_dir or delete that one")
    return builder


def main(argv: list[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    print(f"building mini_world (train {args.num_train}, heldout "
          f"{len(scenes.split_indices('heldout'))}) under {args.data_dir} ...", flush=True)
    builder = build_mini_world(args.data_dir, args.num_train)
    for name, split in builder.info.splits.items():
        print(f"  {name}: {split.num_examples} examples", flush=True)
    print(f"prepared: {builder.data_dir}")
    print(f"train with: --config projects/miniworld/configs/world.py:data={args.data_dir}")
    return 0


if __name__ == "__main__":
    from projects.miniworld.tfds_builder import main as _main  # the registered module's builder

    sys.exit(_main())
