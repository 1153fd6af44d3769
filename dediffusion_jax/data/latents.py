"""Precomputed VAE latents: a dataset encoded ONCE, so the train step skips the VAE encode.

    python -m dediffusion_jax.encode_latents --config CONFIG[:ARG] --out DIR [--config.KEY=VALUE ...]
    python -m dediffusion_jax.train --config CONFIG[:ARG] --config.data.source=latents:DIR ...

A latents folder holds array_record shards (`latents-00000.array_record`, ...) written with the same
writer and read with the same grain reader as `arrayrecord:` sources, and `manifest.json`. One record =
one example, a msgpack map
    {'id': str, 'backbone': ARRAY, 'latent_mean': ARRAY, 'latent_logvar': ARRAY}
where ARRAY = {'dtype': str, 'shape': [int, ...], 'data': bytes} (self-describing, C order):
the backbone view exactly as the run's preprocessing makes it (normalised, [S, S, 3]) and the VAE
posterior of the decoder view, unscaled ([h, w, latent_channels]; z = mean + exp(logvar / 2) * eps,
then the VAE's shift and scaling factor, is left to the step, which draws eps from its own key).

The manifest names what the folder was made from: the decoder's weights identity (`LoadedDecoder
.identity`) and path, the config's data source, the views (backbone size and normalisation, decoder
view size, compute dtype), the stored dtypes and shapes, the shard size and the finished shards with
their counts. The encoder refuses to add to a folder made from another decoder or source; the trainer
refuses a folder of another decoder identity, backbone size or normalisation, and an unfinished one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from dediffusion_jax.data import sources
from dediffusion_jax.errors import UserError

FORMAT = "dediffusion_jax.latents"
VERSION = 1
MANIFEST = "manifest.json"
ARRAY_FIELDS = ("backbone", "latent_mean", "latent_logvar")
ENCODE_COMMAND = "python -m dediffusion_jax.encode_latents"


class LatentsError(UserError, ValueError):
    """A latents folder that does not fit the run (other decoder, other views, unfinished) or the
    encode (another decoder or source in the same folder)."""


def shard_name(index: int) -> str:
    return f"latents-{index:05d}.array_record"


# ------------------------------------------------------------------------------------------ records


def _pack_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def _unpack_array(d: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def encode_record(record: Mapping[str, Any]) -> bytes:
    """{'id', 'backbone', 'latent_mean', 'latent_logvar'} (numpy arrays, stored as they are) -> bytes."""
    out: dict[str, Any] = {"id": str(record["id"])}
    for name in ARRAY_FIELDS:
        out[name] = _pack_array(np.asarray(record[name]))
    return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of encode_record (arrays in their stored dtype, read-only views of the bytes)."""
    record = msgpack.unpackb(data, raw=False)
    if not isinstance(record, dict) or any(k not in record for k in ARRAY_FIELDS):
        raise ValueError(f"not a latents record (a msgpack map with 'id' and {list(ARRAY_FIELDS)})")
    return {"id": record["id"], **{k: _unpack_array(record[k]) for k in ARRAY_FIELDS}}


def write_records(path: str | os.PathLike, records: Any) -> int:
    """Latents records -> one array_record file (the writer of `arrayrecord:` sources)."""
    return sources.write_array_record(path, records, encode=encode_record)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of one shard file, in order (the grain reader of `arrayrecord:` sources)."""
    import grain

    shard = grain.sources.ArrayRecordDataSource([str(path)])
    return [decode_record(shard[i]) for i in range(len(shard))]


def latent_views(record: Mapping[str, Any], rng: Any = None) -> dict[str, Any]:
    """The `preprocess_fn` of the latents source: the stored fields as float32 (the pipeline's
    batches, as the standard views are), the VAE posterior in place of the decoder view."""
    return {"id": str(record["id"]), **{k: np.asarray(record[k], np.float32) for k in ARRAY_FIELDS}}


# ----------------------------------------------------------------------------------------- manifest


def manifest_path(directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser() / MANIFEST


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, or None when there is none yet."""
    path = manifest_path(directory)
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise LatentsError(f"{path} is not a latents manifest (format {manifest.get('format')!r}, "
                           f"expected {FORMAT!r})")
    if int(manifest.get("version", 0)) != VERSION:
        raise LatentsError(f"{path} has latents format version {manifest.get('version')}; this code "
                           f"reads version {VERSION}: re-encode with {ENCODE_COMMAND}")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Atomically (a temp file renamed over it): a reader sees the old manifest or the new one."""
    path = manifest_path(directory)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


# What must agree between the folder and a rerun of the encode into it (decoder, source, views, dtypes,
# shard size): each is a key of the manifest, compared as JSON values.
ENCODE_KEYS = ("decoder.identity", "data_source", "views", "dtypes", "shard_size", "num_source_records")


def _get(manifest: Mapping[str, Any], key: str) -> Any:
    value: Any = manifest
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def check_same_encode(existing: Mapping[str, Any], new: Mapping[str, Any], directory: Any) -> None:
    """A rerun may only finish the folder it started: one line naming each field that differs."""
    differ = [f"{k}: {_get(existing, k)!r} there, {_get(new, k)!r} now" for k in ENCODE_KEYS
              if json.loads(json.dumps(_get(existing, k))) != json.loads(json.dumps(_get(new, k)))]
    if differ:
        raise LatentsError(f"{directory} holds latents of another encode ({'; '.join(differ)}); "
                           f"use another --out folder, or delete it to start again")


def check_finished(manifest: Mapping[str, Any], directory: Any) -> None:
    if not manifest.get("complete"):
        raise LatentsError(f"latents folder {directory} is unfinished ({len(manifest.get('shards', []))} "
                           f"of {manifest.get('num_shards')} shards): run {ENCODE_COMMAND} again to finish it")


def check_for_run(manifest: Mapping[str, Any], directory: Any, *, decoder_identity: str,
                  decoder_path: Any, backbone_size: int, backbone_mean: Any, backbone_std: Any) -> None:
    """The trainer's check: the folder is finished, made with this run's decoder weights and with the
    backbone view this run's encoder expects. Raises LatentsError (one line)."""
    check_finished(manifest, directory)
    dec = manifest.get("decoder", {})
    if dec.get("identity") != decoder_identity:
        raise LatentsError(f"latents folder {directory} was encoded with decoder {dec.get('identity')} "
                           f"({dec.get('path')}), but this run's decoder is {decoder_identity} "
                           f"({decoder_path}): re-encode with {ENCODE_COMMAND} and this decoder")
    views = manifest.get("views", {})
    want = {"backbone_size": int(backbone_size), "backbone_mean": [float(x) for x in backbone_mean],
            "backbone_std": [float(x) for x in backbone_std]}
    differ = [f"{k} {views.get(k)!r} there, {v!r} in this run" for k, v in want.items()
              if not (np.shape(views.get(k)) == np.shape(v) and np.allclose(views.get(k), v, rtol=1e-6))]
    if differ:
        raise LatentsError(f"latents folder {directory} holds other backbone views ({'; '.join(differ)}): "
                           f"re-encode with {ENCODE_COMMAND} and this run's config")


# ------------------------------------------------------------------------------------------- source


class LatentsSource:
    """The records of a finished latents folder, in shard order (`len()`, `source[i]`)."""

    def __init__(self, directory: str | os.PathLike):
        import grain

        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise sources.SourceError(f"latents folder {str(self.directory)!r} does not exist "
                                      f"(make one with {ENCODE_COMMAND})")
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise sources.SourceError(f"{str(self.directory)!r} has no {MANIFEST}: not a latents folder "
                                      f"(make one with {ENCODE_COMMAND})")
        check_finished(manifest, self.directory)
        self.manifest = manifest
        self.paths = [str(self.directory / s["file"]) for s in manifest["shards"] if s["records"]]
        if not self.paths:
            raise sources.SourceError(f"latents folder {str(self.directory)!r} holds no records")
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def check_run(self, *, decoder_identity: str, decoder_path: Any, backbone_size: int,
                  backbone_mean: Any, backbone_std: Any) -> None:
        check_for_run(self.manifest, self.directory, decoder_identity=decoder_identity,
                      decoder_path=decoder_path, backbone_size=backbone_size,
                      backbone_mean=backbone_mean, backbone_std=backbone_std)

    def example_fields(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{field: (shape of a batch of it, dtype the step sees)} for the step's example batch."""
        shapes = self.manifest["shapes"]
        return {"backbone": ((batch_size, *shapes["backbone"]), "float32"),
                "latent_mean": ((batch_size, *shapes["latent"]), "float32"),
                "latent_logvar": ((batch_size, *shapes["latent"]), "float32")}

    def __repr__(self) -> str:
        return f"LatentsSource({str(self.directory)!r}, {len(self.paths)} shards, {len(self)} records)"


def is_latents_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().startswith("latents:")


def directory_of(spec: str) -> str:
    return spec.strip()[len("latents:"):]


def built_source(rest: str) -> sources.BuiltSource:
    """`latents:DIR` -> the source and its preprocess_fn (the stored views, as float32)."""
    if not rest:
        raise sources.SourceSpecError(f"latents spec without a folder\n{sources.SPEC_FORMS}")
    return sources.BuiltSource(LatentsSource(rest), preprocess_fn=latent_views)
