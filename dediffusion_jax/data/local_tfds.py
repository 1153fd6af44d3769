"""What this project's own tfds builders share (projects/miniworld/tfds_builder.py, and the tests'
tests/helpers/testing_builders.py): datasets generated locally, never downloaded, written in
array_record format for random access.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import tensorflow_datasets as tfds
from etils import epath


class LocalCodePath:
    """Mixin, listed before tfds.core.GeneratorBasedBuilder: `code_path` = the builder's own file.

    tfds' default `code_path` touches `importlib_resources`, which is not installed in this venv
    (ModuleNotFoundError at download_and_prepare); the answer it would compute is just that file.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(sys.modules[cls.__module__].__file__)


def prepare_array_record(builder_cls: type[tfds.core.DatasetBuilder], data_dir: str | os.PathLike,
                         **kwargs: Any) -> tfds.core.DatasetBuilder:
    """Builds `builder_cls(data_dir=..., **kwargs)` in array_record format under data_dir (a no-op if
    already prepared there; nothing is downloaded) and returns the builder."""
    builder = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record", **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
