"""Convert pytorch-fid's InceptionV3 checkpoint to safetensors for `inception.load_inception`.

Why: FID must use the TF "2015-12-05" Inception weights that pytorch-fid ships as a torch pickle.
Pickles can execute code, so the project reads this one file in exactly one place, here, with
`torch.load(..., weights_only=True)` (tensors and plain containers only), checks every key and
shape against the Flax module, and writes safetensors, which is all the rest of the code reads.

Getting the checkpoint (nothing in this project downloads it): pytorch-fid's release asset

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(about 91 MB; `6726825d` is the start of its SHA-256, which this tool checks and reports). Then

    python -m dediffusion_jax.evaluation.convert_inception \\
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.safetensors

The output keeps pytorch-fid's key names and torch layout (minus the unused 1008-way `fc` head and
BatchNorm step counters), so it can also be inspected or loaded back into pytorch-fid's network.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Sequence

from dediffusion_jax.cli_flags import answer_help_early
from dediffusion_jax import errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--output", required=True, help="where to write the .safetensors file")
    parser.add_argument(errors.DEBUG_FLAG, action="store_true", help=errors.DEBUG_HELP)
    return parser


if __name__ == "__main__":
    answer_help_early(build_parser)  # before the heavy imports below

import numpy as np

from dediffusion_jax import weights
from dediffusion_jax.evaluation import inception

EXPECTED_SHA256_PREFIX = "6726825d"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The one pickle read in the project: `torch.load(weights_only=True)` -> numpy arrays."""
    import torch

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a torch state dict (str -> tensor)")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def convert(
    input_path: str | os.PathLike, output_path: str | os.PathLike, sha256: str | None = None
) -> dict[str, np.ndarray]:
    """Validates the checkpoint against `InceptionV3FID` and writes it as safetensors.

    Raises `convert.CheckpointMismatchError` (and writes nothing) if any tensor is missing,
    unexpected or misshapen. Returns the tensors written.
    """
    state = read_torch_state_dict(input_path)
    inception.variables_from_torch(state, source=os.fspath(input_path))  # raises on mismatch
    ignore = [re.compile(p) for p in inception.TORCH_IGNORE]
    kept = {
        k: np.ascontiguousarray(v) for k, v in state.items() if not any(r.search(k) for r in ignore)
    }
    metadata = {
        "format": "pt",
        "model": "pytorch-fid InceptionV3 (pt_inception-2015-12-05), pool3 trunk",
        "source_file": os.path.basename(os.fspath(input_path)),
        "source_sha256": sha256 or sha256_of(input_path),
    }
    weights.save(kept, output_path, metadata=metadata)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """The command; a user error (a bad path, file or value) is one `error: ...` line, status 2."""
    return errors.run_main(_cli, argv)


def _cli(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)

    digest = sha256_of(args.input)
    if not digest.startswith(EXPECTED_SHA256_PREFIX):
        print(
            f"warning: {args.input} has sha256 {digest[:16]}..., not the pytorch-fid release "
            f"({EXPECTED_SHA256_PREFIX}...); FID values will not be comparable with published ones",
            file=sys.stderr,
        )
    kept = convert(args.input, args.output, sha256=digest)
    print(f"wrote {len(kept)} tensors to {args.output} (sha256 of input {digest[:16]}...)")


if __name__ == "__main__":
    sys.exit(main())
