"""Random-access image sources: `len(source)` and `source[i] -> record dict`, usable by grain.

Every source returns records of one shape so that one preprocessing function serves them all:
    {'id': str,                  # stable across runs: a relative path, a tfds id, a stored id
     'image': bytes | np.ndarray, # ENCODED bytes where possible: decoding happens in the guarded
                                  #   preprocessing step, so a corrupt image is skipped, not fatal
     'captions': list[str],       # only where the data has captions (coco_captions)
     'label': int}                # only where the data has labels (imagenet2012)

Sources never download anything. `source_from_spec` builds one from a string (see its docstring).
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np

from dediffusion_jax.errors import UserError

DEFAULT_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


class SourceError(UserError, FileNotFoundError):
    """A source the user named is missing or holds no images (a FileNotFoundError, as before)."""


class SourceSpecError(UserError, ValueError):
    """A data source spec that cannot be read (malformed, unknown prefix, a missing folder)."""


class ImageSource(Protocol):
    """What the pipeline needs: a length and random access to record dicts."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# --------------------------------------------------------------------------------------- folders


class ImageFolderSource:
    """All images under `root` (recursive), sorted by relative path so every host sees one order.

    The file is read in `__getitem__` (cheap listing, no decoding); a broken file surfaces as a
    CorruptExampleError / OSError in the pipeline, which skips and counts it.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = DEFAULT_EXTENSIONS):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise SourceError(f"image folder {str(self.root)!r} does not exist")
        exts = {e.lower().lstrip(".") for e in extensions}
        paths = [p for p in self.root.rglob("*")
                 if p.suffix.lower().lstrip(".") in exts and p.is_file()]
        self._relpaths = sorted(p.relative_to(self.root).as_posix() for p in paths)
        if not self._relpaths:
            raise SourceError(
                f"no images with extensions {sorted(exts)} under {str(self.root)!r}")

    def __len__(self) -> int:
        return len(self._relpaths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel = self._relpaths[index]
        return {"id": rel, "image": (self.root / rel).read_bytes()}

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self)} images)"


# ---------------------------------------------------------------------------------- array_record
#
# Record format (one array_record record = one example): a msgpack map with str keys
#   {'id': str, 'image': bytes (an encoded PNG/JPEG/WebP file), optional 'captions': [str, ...],
#    optional 'label': int, any other msgpack-able extras}.
# Chosen because it is self-describing, needs no schema file, reads in microseconds, and any
# language with a msgpack library can write it. Write with group_size:1 for cheap random access.


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One example -> record bytes. 'image' must be encoded bytes, 'id' a string."""
    if not isinstance(record.get("image"), (bytes, bytearray)):
        raise TypeError("record['image'] must be encoded image bytes (PNG/JPEG/WebP file content)")
    if not isinstance(record.get("id"), str):
        raise TypeError("record['id'] must be a str")
    return msgpack.packb(dict(record), use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> example dict (inverse of encode_record)."""
    record = msgpack.unpackb(data, raw=False)
    if not isinstance(record, dict) or "image" not in record:
        raise ValueError("array_record record is not a msgpack map with an 'image' field")
    return record


def write_array_record(path: str | os.PathLike, records: Iterable[Mapping[str, Any]], *,
                       encode: Callable[[Mapping[str, Any]], bytes] = encode_record) -> int:
    """Writes examples (see the record format above) to one array_record file; returns the count.
    `encode`: record -> bytes, for another record format (data/latents.py's)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    try:
        for record in records:
            writer.write(encode(record))
            n += 1
    finally:
        writer.close()
    return n


class ArrayRecordSource:
    """Examples stored with `write_array_record`, from one or more files (globs allowed)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        import grain

        patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files: list[str] = []
        for pattern in patterns:
            matched = sorted(glob_lib.glob(os.path.expanduser(str(pattern))))
            if not matched:
                raise SourceError(f"no array_record files match {str(pattern)!r}")
            files.extend(matched)
        self.paths = files
        self._source = grain.sources.ArrayRecordDataSource(files)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


# ------------------------------------------------------------------------------------------ tfds


def default_tfds_data_dir() -> str:
    """$TFDS_DATA_DIR or ~/tensorflow_datasets, as tfds itself does."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _find_prepared_dir(name: str, data_dir: Path) -> Path:
    """data_dir/NAME[/CONFIG]/VERSION holding dataset_info.json (newest version unless given)."""
    base, _, version = name.partition(":")
    root = data_dir / base
    if version:
        candidates = [root / version] if (root / version / "dataset_info.json").is_file() else []
    else:
        candidates = sorted((p for p in root.glob("*") if p.is_dir()
                             and re.fullmatch(r"\d+\.\d+\.\d+", p.name)
                             and (p / "dataset_info.json").is_file()),
                            key=lambda p: _version_key(p.name))
    if not candidates:
        pattern = root / (version or "<X.Y.Z>") / "dataset_info.json"
        raise SourceError(
            f"tfds dataset {name!r} is not prepared under data_dir {str(data_dir)!r} (looked for "
            f"{str(pattern)!r}). Nothing is downloaded here: prepare it elsewhere with "
            f"`tfds build {base.split('/')[0]} --data_dir=DIR --file_format=array_record` "
            f"(manual_dir for imagenet2012) and copy DIR over, or pass the right data_dir.")
    return candidates[-1]


class TfdsSource:
    """A prepared tfds dataset (array_record format) in a local data_dir; never downloads.

    Reads through `tfds.builder_from_directory`, so the dataset's builder class need not be
    importable. Images are kept ENCODED (the guarded preprocessing decodes them); captions are
    kept when present (coco_captions 'captions/text'), labels too ('label').

    Args:
      name: 'coco_captions/2014', 'imagenet2012', optionally with ':VERSION' (default: newest).
      split: any tfds split string, e.g. 'validation', 'train[:1000]'.
      data_dir: the tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
      image_key / id_keys: feature names; the id is the first of id_keys present, else
        'NAME/SPLIT/INDEX'.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                 image_key: str = "image",
                 id_keys: Sequence[str] = ("image/id", "id", "image/filename", "file_name",
                                           "filename")):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self.data_dir = Path(data_dir or default_tfds_data_dir()).expanduser()
        self.prepared_dir = _find_prepared_dir(name, self.data_dir)
        builder = tfds.builder_from_directory(str(self.prepared_dir))
        features = builder.info.features
        if image_key not in features:
            raise SourceSpecError(f"{name} has no image feature {image_key!r}; features: {list(features)}")
        self.image_key = image_key
        self.id_key = next((k for k in id_keys if k in features), None)
        self.has_captions = "captions" in features
        self.has_label = "label" in features
        try:
            self._source = builder.as_data_source(
                split, decoders={image_key: tfds.decode.SkipDecoding()})
        except NotImplementedError as e:
            raise SourceSpecError(
                f"{self.prepared_dir} is not in array_record format (random access needs it); "
                f"rebuild with --file_format=array_record") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._source[index]
        if self.id_key is not None:
            raw_id = ex[self.id_key]
            raw_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if isinstance(raw_id, np.generic):
                raw_id = raw_id.item()
            rid = f"{self.name.split(':')[0]}/{self.id_key}={raw_id}"
        else:
            rid = f"{self.name.split(':')[0]}/{self.split}/{index}"
        record: dict[str, Any] = {"id": rid, "image": ex[self.image_key]}
        if self.has_captions:
            caps = ex["captions"]
            texts = caps["text"] if isinstance(caps, Mapping) else caps
            record["captions"] = [t.decode() if isinstance(t, bytes) else str(t)
                                  for t in np.asarray(texts).reshape(-1).tolist()]
        if self.has_label:
            record["label"] = int(ex["label"])
        return record

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {str(self.prepared_dir)!r}, {len(self)})"


# ------------------------------------------------------------------------------------------ specs

SPEC_FORMS = """accepted source specs:
  tfds:NAME[/CONFIG][:VERSION]:SPLIT[@DATA_DIR]   e.g. tfds:coco_captions/2014:validation@/data/tfds
                                                   (DATA_DIR defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets;
                                                   SPLIT may be sliced: train[:1000])
  folder:PATH  or an existing directory PATH        images under PATH (jpg, jpeg, png, webp), recursive
  arrayrecord:GLOB[,GLOB...]                        files written by write_array_record
  latents:DIR                                       backbone views + VAE posteriors precomputed by
                                                   python -m dediffusion_jax.encode_latents (data/latents.py)"""

_TFDS_SPEC = re.compile(
    r"^(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?)"
    r"(?::(?P<version>\d+\.\d+\.\d+))?"
    r":(?P<split>[^@]+)"
    r"(?:@(?P<data_dir>.+))?$")


# --------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class BuiltSource:
    """What a spec resolves to. `preprocess_fn` (record, rng) -> {"backbone", "decoder", ...} replaces
    the standard `preprocess.Preprocessor` when a source brings its own views (None: the standard one)."""

    source: ImageSource
    preprocess_fn: Callable[..., dict] | None = None


SourceFactory = Callable[[str, Any], BuiltSource]
_REGISTRY: dict[str, SourceFactory] = {}


def register_source(prefix: str, factory: SourceFactory) -> None:
    """Makes `PREFIX:REST` a data spec. `factory(REST, config)` -> BuiltSource.

    How a project plugs in its own data (e.g. projects/miniworld registers `miniworld:`): list the module
    that calls this in the config's `imports`, and the trainer imports it before reading data.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", prefix):
        raise ValueError(f"source prefix {prefix!r}: use lower-case letters, digits and _")
    _REGISTRY[prefix] = factory


def registered_prefixes() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_source(spec: str, config: Any = None) -> BuiltSource:
    """A spec -> BuiltSource: a registered prefix, or one of the built-in forms of SPEC_FORMS."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceSpecError(f"empty source spec {spec!r}\n{spec_forms()}")
    prefix, sep, rest = spec.strip().partition(":")
    if sep and prefix in _REGISTRY:
        return _REGISTRY[prefix](rest, config)
    return BuiltSource(source_from_spec(spec))


def spec_forms() -> str:
    extra = "".join(f"  {p}:...      (registered by an imported extension)\n" for p in registered_prefixes()
                    if f"\n  {p}:" not in SPEC_FORMS)
    return SPEC_FORMS + extra


def source_from_spec(spec: str) -> ImageSource:
    """Builds a source from a config string; see SPEC_FORMS (also shown in every error)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceSpecError(f"empty source spec {spec!r}\n{SPEC_FORMS}")
    spec = spec.strip()
    if spec.startswith("tfds:"):
        m = _TFDS_SPEC.match(spec[len("tfds:"):])
        if not m:
            raise SourceSpecError(f"malformed tfds spec {spec!r}\n{SPEC_FORMS}")
        name = m["name"] + (f":{m['version']}" if m["version"] else "")
        return TfdsSource(name, m["split"], m["data_dir"])
    if spec.startswith("arrayrecord:"):
        patterns = [p for p in spec[len("arrayrecord:"):].split(",") if p]
        if not patterns:
            raise SourceSpecError(f"arrayrecord spec without a path {spec!r}\n{SPEC_FORMS}")
        return ArrayRecordSource(patterns)
    if spec.startswith("folder:"):
        path = spec[len("folder:"):]
        if not Path(path).expanduser().is_dir():
            raise SourceSpecError(f"folder {path!r} does not exist\n{SPEC_FORMS}")
        return ImageFolderSource(path)
    if Path(spec).expanduser().is_dir():
        return ImageFolderSource(spec)
    raise SourceSpecError(f"unrecognised source spec {spec!r} (not a known prefix, not an existing "
                     f"directory)\n{SPEC_FORMS}")


def _latents(rest: str, config: Any) -> BuiltSource:
    from dediffusion_jax.data import latents

    return latents.built_source(rest)


register_source("latents", _latents)  # data/latents.py; imported lazily (it is only needed then)
