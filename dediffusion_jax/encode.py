"""Images -> De-Diffusion text with a trained encoder, written as JSONL.

    python -m dediffusion_jax.encode --checkpoint WORKDIR[/checkpoints/STEP]|EXPORTED_FOLDER \
        --images FILE|DIR|tfds:NAME:SPLIT[@DATA_DIR]|arrayrecord:GLOB ... --out texts.jsonl \
        [--decoder DECODER_FOLDER] [--batch-size 32] [--limit N]

One line per readable image: {"id", "text", "token_ids"[, "path"]}. The text is the argmax tokens of
the encoder detokenized with the decoder's own tokenizer (exactly what the decoder would read); the
ids are kept so nothing is lost to detokenization. Ids match the image sources' ids (a folder's
relative paths, a tfds id), so the file plugs into `python -m dediffusion_jax.evaluate --texts`.
Unreadable images are reported on stderr, counted and skipped; they never stop the run.

The core (`encode_records`, `encode_to_jsonl`) takes an `inference.TextEncoder` (from a training
checkpoint or an exported folder, `TextEncoder.load`); `--decoder` overrides the decoder folder
recorded with the encoder (its weights must hash to the recorded identity).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from dediffusion_jax import errors as errors_lib
from dediffusion_jax.data.preprocess import (CorruptExampleError, PreprocessConfig, decode_image,
                                             two_views)

ErrorFn = Callable[[str, str], None]
_SPEC_PREFIXES = ("tfds:", "arrayrecord:", "folder:")


# ------------------------------------------------------------------------------------ image input


def iter_image_records(specs: Sequence[str], limit: int | None = None,
                       on_error: ErrorFn | None = None) -> Iterator[dict[str, Any]]:
    """Records {'id', 'image' (bytes), 'path'?} from files, folders and source specs, in order.

    A file's id is its path as given; a folder's images have their path relative to the folder as id
    (as `ImageFolderSource` names them); tfds/arrayrecord specs keep the source's ids. A file that
    cannot be read is passed to `on_error(id, reason)` and skipped.
    """
    from dediffusion_jax.data.sources import ImageFolderSource, source_from_spec

    count = 0
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file() or not (path.is_dir() or spec.startswith(_SPEC_PREFIXES)):
            # a file (a missing one is reported by on_error like any unreadable image)
            items: Iterable[tuple[str, Callable[[], dict]]] = [
                (spec, lambda p=path, s=spec: {"id": s, "image": p.read_bytes(), "path": str(p)})]
        else:
            src = ImageFolderSource(path) if path.is_dir() else source_from_spec(spec)
            root = getattr(src, "root", None)

            def make(i: int, src=src, root=root) -> dict:
                rec = dict(src[i])
                if root is not None:
                    rec["path"] = str(root / rec["id"])
                return rec

            items = ((f"{spec}[{i}]", lambda i=i: make(i)) for i in range(len(src)))
        for name, fetch in items:
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                yield fetch()
            except (OSError, CorruptExampleError, ValueError) as e:
                if on_error is None:
                    raise
                on_error(name, f"{type(e).__name__}: {e}")


def backbone_view(record: dict[str, Any], preprocess: PreprocessConfig) -> np.ndarray:
    """The encoder's input for one record; raises CorruptExampleError for an unusable image."""
    im = decode_image(record["image"], max_pixels=preprocess.max_pixels,
                      min_side=preprocess.min_decode_side())
    return two_views(im, preprocess)[0]


# ------------------------------------------------------------------------------------ encoding


def encode_records(
    records: Iterable[dict[str, Any]],
    encoder: Any,
    *,
    on_error: ErrorFn | None = None,
) -> Iterator[dict[str, Any]]:
    """Records -> {'id', 'text', 'token_ids'[, 'path']} in input order, corrupt images skipped.

    `encoder`: an `inference.TextEncoder`. `on_error(id, reason)` hears about every image that could
    not be decoded (default: re-raise).
    """
    preprocess = encoder.preprocess
    pending: list[tuple[dict, np.ndarray]] = []

    def flush() -> Iterator[dict[str, Any]]:
        ids = encoder.token_ids(np.stack([v for _, v in pending]))
        texts = encoder.texts_of_ids(ids)
        for (rec, _), text, row in zip(pending, texts, ids):
            out = {"id": str(rec.get("id", "")), "text": text,
                   "token_ids": [int(t) for t in row]}
            if "path" in rec:
                out["path"] = rec["path"]
            yield out
        pending.clear()

    for rec in records:
        try:
            view = backbone_view(rec, preprocess)
        except CorruptExampleError as e:
            if on_error is None:
                raise
            on_error(str(rec.get("id", "?")), str(e))
            continue
        pending.append((rec, view))
        if len(pending) >= encoder.batch_size:
            yield from flush()
    if pending:
        yield from flush()


def encode_to_jsonl(
    specs: Sequence[str],
    out: str | os.PathLike,
    encoder: Any,
    *,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encodes every image of `specs` into `out` (JSONL) with `encoder` (an `inference.TextEncoder`).

    Returns {'encoded': count, 'skipped': count, 'errors': [(id, reason), ...]}.
    """
    errors: list[tuple[str, str]] = []

    # The progress bar only on a terminal (in a log file every redraw is one more line), and the
    # skip lines through it, so they never land in the middle of the bar.
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc="encode", unit="img", file=sys.stderr)

    def on_error(name: str, reason: str) -> None:
        errors.append((name, reason))
        line = f"skipped unreadable image {name}: {reason}"
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(21, "--out is a folder, not a file", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    records = iter_image_records(specs, limit=limit, on_error=on_error)
    n = 0
    try:
        with open(tmp, "w") as f:
            for row in encode_records(records, encoder, on_error=on_error):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
                if bar is not None:
                    bar.update(1)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written OUT.tmp left behind
        raise
    finally:
        if bar is not None:
            bar.close()
    print(f"encoded {n} images -> {out}; skipped {len(errors)} unreadable", file=sys.stderr,
          flush=True)
    return {"encoded": n, "skipped": len(errors), "errors": errors}


def default_mesh() -> Any:
    """A pure data-parallel mesh over all devices, or None on one device."""
    import jax

    if jax.device_count() <= 1:
        return None
    from dediffusion_jax.parallel.mesh import make_mesh

    return make_mesh({"data": -1})


# ---------------------------------------------------------------------------------------- the CLI


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dediffusion_jax.encode",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a training workdir (latest checkpoint), WORKDIR/checkpoints/STEP, or a "
                        "folder exported by TextEncoder.export")
    p.add_argument("--decoder", default=None,
                   help="decoder folder to use instead of the one recorded with the encoder (its "
                        "weights must hash to the recorded identity)")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, folders, or source specs (tfds:NAME:SPLIT[@DIR], "
                        "arrayrecord:GLOB, folder:PATH)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="encode at most this many images")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(errors_lib.DEBUG_FLAG, action="store_true", help=errors_lib.DEBUG_HELP)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when something was encoded, 1 when nothing was, 2 for a user error (one line)."""
    return errors_lib.run_main(_main, argv)


def _main(argv: list[str]) -> int:
    args = _parse(argv)
    import logging

    from dediffusion_jax.inference import TextEncoder

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on opening a checkpoint

    try:
        encoder = TextEncoder.load(args.checkpoint, args.decoder, batch_size=args.batch_size,
                                   mesh=default_mesh())
    except (errors_lib.UserError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: cannot load the encoder {args.checkpoint}: {errors_lib.message(e)}",
              file=sys.stderr)
        return 2
    summary = encode_to_jsonl(args.images, args.out, encoder, limit=args.limit,
                              progress=not args.no_progress)
    return 0 if summary["encoded"] else 1


if __name__ == "__main__":
    sys.exit(main())
