r"""Encodes a run's dataset ONCE into (backbone view, VAE posterior) records, so training skips the VAE.

    python -m dediffusion_jax.encode_latents --config CONFIG[:ARG] --out DIR [--config.KEY=VALUE ...] \
        [--shard-size 1024] [--batch-size 64] [--latent-dtype float32|float16] [--backbone-dtype float16|float32]
    python -m dediffusion_jax.train --config CONFIG[:ARG] --workdir RUN [the same --config.KEY=VALUE ...] \
        --config.data.source=latents:DIR

The config (and its overrides) is read as the trainer reads it; its data.source and its preprocessing
(the backbone view at backbone.image_size with the backbone's normalisation, the decoder view at the
decoder's size) make each record exactly as a training run would, and the decoder's VAE (in the
config's compute dtype) encodes the decoder view into its posterior (mean, logvar). Each record is
stored as {id, backbone view, latent mean, latent logvar} in array_record shards of --shard-size
source records (data/latents.py has the format); the train step then draws z = mean + exp(logvar/2)
* eps from its own key and scales it as its own encode would.

Sharded over the devices of the config's mesh (the batch split over data x fsdp). Resumable: a shard is
written to a temporary file and renamed when complete, manifest.json lists the finished shards, and a
rerun (the same command) skips them. A rerun with another decoder (weights identity), data source,
views, dtypes or shard size into the same folder is refused with one line. Corrupt images are
skipped and counted, as in training. Augmentation (data.preprocess.augment) is refused: stored views
are one fixed view per image.

Storage: the backbone view as float16 by default (it is normalised floats from any preprocess_fn; the
float16 step, < 1e-3 at |x| < 2, is under a tenth of one 8-bit pixel level after CLIP's normalisation),
the posterior as float32 by default (--latent-dtype float16 halves it; docs/training.md gives the
measured effect of each on the loss).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dediffusion_jax import cli_flags, errors as errors_lib

DTYPES = ("float32", "float16")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Range:
    """source[start:stop] as a source (one shard's records)."""

    def __init__(self, source: Any, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self.start + int(index)]


def make_encode_fn(decoder_spec: Any, mesh: Any) -> Any:
    """jit(vae_params, images [B, H, W, 3]) -> (mean, logvar), the batch split over data x fsdp."""
    import jax

    from dediffusion_jax.parallel.mesh import batch_sharding, replicated
    from dediffusion_jax.t2i.vae import AutoencoderKL

    vae = decoder_spec.vae
    batch = batch_sharding(mesh)

    def encode(params: Any, images: Any) -> Any:
        return vae.apply({"params": params}, images, method=AutoencoderKL.encode)

    return jax.jit(encode, in_shardings=(replicated(mesh), batch), out_shardings=(batch, batch))


def encode_latents(config: Any, out: str | os.PathLike, *, decoder: Any = None, mesh: Any = None,
                   shard_size: int = 1024, batch_size: int = 64, latent_dtype: str = "float32",
                   backbone_dtype: str = "float16", max_shards: int | None = None) -> dict[str, Any]:
    """Encodes config.data.source into the latents folder `out` (or finishes it); returns the manifest.

    `decoder`: a loaded decoder (default: config.decoder.path); `mesh`: default the config's;
    `max_shards`: write at most this many new shards, then stop (the folder stays unfinished).
    Raises LatentsError (another encode's folder, augmentation, a pixel decoder) and the source's and
    decoder's own user errors.
    """
    import jax
    import numpy as np

    from dediffusion_jax.data import latents as latents_lib, pipeline
    from dediffusion_jax.models import build as model_build
    from dediffusion_jax.parallel.mesh import batch_sharding, replicated
    from dediffusion_jax.train import loop

    LatentsError = latents_lib.LatentsError
    if latent_dtype not in DTYPES or backbone_dtype not in DTYPES:
        raise LatentsError(f"dtypes must be one of {DTYPES}, got {latent_dtype!r}, {backbone_dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise LatentsError(f"--shard-size ({shard_size}) and --batch-size ({batch_size}) must be >= 1")
    spec = str(config.data.source)
    if latents_lib.is_latents_spec(spec):
        raise LatentsError(f"data.source={spec!r} is already a latents folder; give the image source")
    if bool(config.data.preprocess.augment):
        raise LatentsError("data.preprocess.augment=True: a latents folder stores one fixed view per "
                           "image; encode (and train) with --config.data.preprocess.augment=False")
    if jax.process_count() > 1:
        raise LatentsError("encode_latents runs in one process (it may use all of its devices)")
    decoder = decoder if decoder is not None else loop.load_decoder_for(config)
    if not decoder.is_latent:
        raise LatentsError(f"decoder {decoder.path} is pixel-space (no vae/): it has no latents to "
                           "precompute")
    mesh = mesh if mesh is not None else loop._mesh_from_config(config)
    shards_over = int(mesh.shape["data"] * mesh.shape["fsdp"])
    batch_size = -(-batch_size // shards_over) * shards_over  # a whole number per device
    compute = model_build.decoder_spec_for(config, decoder.spec)
    source, preprocess_fn = loop.source_and_preprocess(config, decoder)
    mean, std = model_build.backbone_normalisation(config)
    out = Path(out).expanduser()
    n = len(source)
    num_shards = math.ceil(n / shard_size)
    manifest: dict[str, Any] = {
        "format": latents_lib.FORMAT, "version": latents_lib.VERSION,
        "decoder": {"identity": decoder.identity, "path": str(decoder.path)},
        "data_source": spec,
        "views": {"backbone_size": int(config.backbone.image_size),
                  "backbone_mean": [float(x) for x in mean], "backbone_std": [float(x) for x in std],
                  "decoder_size": loop._decoder_view_size(config, decoder),
                  "compute_dtype": np.dtype(compute.dtype).name},
        "dtypes": {"backbone": backbone_dtype, "latent": latent_dtype},
        "shapes": None, "shard_size": int(shard_size), "num_source_records": n,
        "num_shards": num_shards, "shards": [], "records": 0, "skipped": 0, "complete": False}
    existing = latents_lib.read_manifest(out)
    if existing is not None:
        latents_lib.check_same_encode(existing, manifest, out)
        manifest["shapes"] = existing.get("shapes")
        manifest["shards"] = [s for s in existing["shards"] if (out / s["file"]).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    done = {int(s["index"]) for s in manifest["shards"]}
    todo = [k for k in range(num_shards) if k not in done]
    _log(f"encode_latents: {n} records of {spec} in {num_shards} shards of {shard_size} -> {out}; "
         f"{len(done)} finished, {len(todo)} to encode; batch {batch_size} over {mesh.devices.size} "
         f"device(s); decoder {decoder.identity}")

    encode = make_encode_fn(compute, mesh)
    vae_params = jax.device_put(decoder.params["vae"], replicated(mesh))
    in_sharding = batch_sharding(mesh)
    start_all, encoded_all = time.perf_counter(), 0
    for written, k in enumerate(todo):
        if max_shards is not None and written >= max_shards:
            break
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        t0 = time.perf_counter()
        data = pipeline.make_dataset(
            _Range(source, start, stop), global_batch_size=batch_size, seed=int(config.seed),
            shuffle=False, num_epochs=1, process_index=0, process_count=1, preprocess_fn=preprocess_fn,
            drop_remainder=False, read_threads=int(config.data.read_threads))
        it = iter(data)
        pending = []  # (ids, backbone views, device outputs): the device works while the host reads
        for batch in it:
            views = np.asarray(batch["backbone"]).astype(backbone_dtype)
            ids = [str(i) for i in batch["id"]]
            images = np.asarray(batch["decoder"], np.float32)
            pad = batch_size - len(ids)
            if pad:
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            pending.append((ids, views, encode(vae_params, jax.device_put(images, in_sharding))))
        records = []
        for ids, views, (lat_mean, lat_logvar) in pending:
            lat_mean, lat_logvar = np.asarray(lat_mean), np.asarray(lat_logvar)
            for i, rid in enumerate(ids):
                records.append({"id": rid, "backbone": views[i],
                                "latent_mean": lat_mean[i].astype(latent_dtype),
                                "latent_logvar": lat_logvar[i].astype(latent_dtype)})
        shapes = ({"backbone": list(records[0]["backbone"].shape),
                   "latent": list(records[0]["latent_mean"].shape)} if records else None)
        if manifest["shapes"] is None:
            manifest["shapes"] = shapes
        elif shapes is not None and shapes != manifest["shapes"]:
            raise LatentsError(f"shard {k} has shapes {shapes}, the folder {manifest['shapes']}")
        name = latents_lib.shard_name(k)
        tmp = out / (name + ".tmp")
        latents_lib.write_records(tmp, records)
        os.replace(tmp, out / name)  # a shard exists under its name only when it is complete
        manifest["shards"] = sorted(
            manifest["shards"] + [{"index": k, "file": name, "start": start, "stop": stop,
                                   "records": len(records), "skipped": int(it.num_skipped)}],
            key=lambda s: s["index"])
        _finish(manifest, num_shards)
        latents_lib.write_manifest(out, manifest)
        seconds = time.perf_counter() - t0
        encoded_all += len(records)
        _log(f"shard {k + 1}/{num_shards} (records {start}..{stop - 1}): {len(records)} encoded, "
             f"{it.num_skipped} skipped, {seconds:.1f} s, {len(records) / max(seconds, 1e-9):.1f} records/s; "
             f"{len(manifest['shards'])}/{num_shards} shards done")
    _finish(manifest, num_shards)
    latents_lib.write_manifest(out, manifest)
    seconds = time.perf_counter() - start_all
    _log(f"encode_latents: {encoded_all} records encoded in {seconds:.1f} s "
         f"({encoded_all / max(seconds, 1e-9):.1f} records/s); folder "
         f"{'complete' if manifest['complete'] else 'unfinished'}: {manifest['records']} records, "
         f"{manifest['skipped']} skipped, {len(manifest['shards'])}/{num_shards} shards")
    return manifest


def _finish(manifest: dict[str, Any], num_shards: int) -> None:
    manifest["records"] = sum(int(s["records"]) for s in manifest["shards"])
    manifest["skipped"] = sum(int(s["skipped"]) for s in manifest["shards"])
    manifest["complete"] = len(manifest["shards"]) == num_shards


# ---------------------------------------------------------------------------------------- the CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dediffusion_jax.encode_latents",
        usage="python -m dediffusion_jax.encode_latents --config CONFIG[:ARG] --out DIR "
              "[--config.KEY=VALUE ...] [options]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Then train with --config.data.source=latents:DIR (docs/training.md, "
               "\"Precomputed latents\").")
    p.add_argument("--config", required=True,
                   help="the run's config file[:ARG], as for python -m dediffusion_jax.train; "
                        "--config.KEY=VALUE overrides it (data.source, decoder.path, ...)")
    p.add_argument("--out", required=True, help="the latents folder (made, or finished when it exists)")
    p.add_argument("--shard-size", type=int, default=1024, help="source records per array_record shard (default 1024)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per VAE call, rounded up to a multiple of the devices (default 64)")
    p.add_argument("--latent-dtype", choices=DTYPES, default="float32",
                   help="stored posterior mean and logvar (default float32)")
    p.add_argument("--backbone-dtype", choices=DTYPES, default="float16", help="stored backbone view (default float16)")
    p.add_argument(errors_lib.DEBUG_FLAG, action="store_true", help=errors_lib.DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    """0 when the folder is complete; 2 with one `error:` line for a user error."""
    return errors_lib.run_main(_main, argv)


def _main(argv: list[str]) -> int:
    own, _, _ = cli_flags.parse_overrides(argv)
    args = _parser().parse_args(own)
    import logging

    from dediffusion_jax.train import cli

    logging.getLogger("absl").setLevel(logging.ERROR)
    config = cli.config_from_argv(args.config, argv)
    manifest = encode_latents(config, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                              latent_dtype=args.latent_dtype, backbone_dtype=args.backbone_dtype)
    return 0 if manifest["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
