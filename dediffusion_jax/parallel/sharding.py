"""Sharding rules: (param-path regex -> spec) tables and logical axis names -> NamedShardings.

One mechanism serves both worlds:
- the TRAINABLE encoder: tables whose specs are mostly *logical* axes (``Logical("embed", "mlp")``),
  mapped to mesh axes by a small, configurable logical-rule table (``DEFAULT_LOGICAL_RULES``);
- the FROZEN decoder (CLIP text / UNet / VAE, third-party layouts we do not annotate): the same
  regex tables with plain ``PartitionSpec``s, e.g. ``[(r".*/kernel", P("fsdp", None)), (r".*", P())]``.

Table semantics (first match wins, ``re.fullmatch`` on the "/"-joined path, e.g.
``params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel``):
- a spec is a ``PartitionSpec`` (mesh axes), a ``Logical`` (logical names), ``None`` (replicate) or
  a callable ``(shape, mesh) -> PartitionSpec`` for shape-dependent choices (``fsdp_largest``);
- a spec with MORE entries than the array has dims does not apply to that array (the next rule is
  tried): this lets one table cover a [D, H, Dh] DenseGeneral kernel and its rank-reduced Adafactor
  statistics, which live under the same path suffix in the optimizer state;
- a mesh axis (or axes) that does not divide its dimension falls back to replication for that dim
  (logged at DEBUG); a mesh axis used twice in one spec is dropped from the later dim;
- an array no rule matches is an error (the message names the path): end a table with ``(".*", P())``
  to replicate everything else instead.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
from flax.core import meta as flax_meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dediffusion_jax.parallel.mesh import BATCH_AXES

log = logging.getLogger(__name__)


class Logical(tuple):
    """Logical axis names, one per array dim (None = not sharded): ``Logical("embed", "mlp")``."""

    def __new__(cls, *names: str | None) -> "Logical":
        return super().__new__(cls, names)

    def __repr__(self) -> str:
        return f"Logical{tuple.__repr__(self)}"


MeshAxes = Union[str, tuple[str, ...], None]
SpecFn = Callable[[tuple[int, ...], Mesh], P]
Spec = Union[P, Logical, SpecFn, None]
RuleTable = Sequence[tuple[str, Spec]]
LogicalRules = Sequence[tuple[str, MeshAxes]]

# Logical name -> mesh axes. "embed" over fsdp is ZeRO-3-style parameter sharding; mlp/heads/vocab
# over tensor is Megatron-style tensor parallelism; batch over data x fsdp.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("queries", None),
    ("length", None),
)


def logical_to_mesh_spec(names: Sequence[str | None],
                         rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> P:
    """Maps logical axis names to a PartitionSpec; an unknown name is an error (catches typos)."""
    table = dict(rules)
    out = []
    for name in names:
        if name is None:
            out.append(None)
        elif name in table:
            out.append(table[name])
        else:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    return P(*out)


def fsdp_largest(axis: str | tuple[str, ...] = "fsdp", min_size: int = 0) -> SpecFn:
    """Spec function: shard the largest dim that `axis` divides; replicate below `min_size` elements.

    Used for kernels without a specific rule and for big frozen decoders, where the largest dim
    gives the most even split and the least chance of a non-dividing shape.
    """
    axes = (axis,) if isinstance(axis, str) else tuple(axis)

    def spec_fn(shape: tuple[int, ...], mesh: Mesh) -> P:
        n = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
        if not shape or math.prod(shape) < min_size:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if shape[dim] % n == 0:
                entries: list[MeshAxes] = [None] * len(shape)
                entries[dim] = axes[0] if len(axes) == 1 else axes
                return P(*entries)
        return P()

    spec_fn.__name__ = f"fsdp_largest({axes}, min_size={min_size})"
    return spec_fn


# Default table for the trainable encoder (ViT backbone, attentional pooler, vocabulary head).
# Names cover Flax's own layers (MultiHeadDotProductAttention query/key/value/out as DenseGeneral
# [D, H, Dh] / [H, Dh, D], as in models/pooler.py; big_vision MlpBlock Dense_0/Dense_1; the pooler's
# mlp_fc1/mlp_fc2) and the CLIP-named ViT (q_proj/k_proj/v_proj/out_proj [D, H*Dh]; mlp/fc1, fc2);
# the vocabulary head is any module whose name contains "vocab" (e.g. VocabularyHead_0/dense).
# Anything else with a kernel/embedding gets FSDP over its largest dim; the rest (biases, norms,
# pooler queries) is replicated.
ENCODER_RULES: tuple[tuple[str, Spec], ...] = (
    (r"(?i).*/(query|key|value)/kernel", Logical("embed", "heads", "kv")),
    (r"(?i).*/(query|key|value)/bias", Logical("heads", "kv")),
    (r"(?i).*/out/kernel", Logical("heads", "kv", "embed")),
    (r"(?i).*/(q_proj|k_proj|v_proj|to_q|to_k|to_v)/kernel", Logical("embed", "heads")),
    (r"(?i).*/(q_proj|k_proj|v_proj|to_q|to_k|to_v)/bias", Logical("heads")),
    (r"(?i).*/(out_proj|to_out(_0)?)/kernel", Logical("heads", "embed")),
    (r"(?i).*mlp.*(dense_0|fc1|wi|c_fc)/kernel", Logical("embed", "mlp")),
    (r"(?i).*mlp.*(dense_0|fc1|wi|c_fc)/bias", Logical("mlp")),
    (r"(?i).*mlp.*(dense_1|fc2|wo|c_proj)/kernel", Logical("mlp", "embed")),
    (r"(?i).*(vocab|logits).*/kernel", Logical("embed", "vocab")),
    (r"(?i).*(vocab|logits).*/bias", Logical("vocab")),
    (r"(?i).*(kernel|embedding)", fsdp_largest("fsdp")),
    (r".*", P()),
)


def frozen_rules(fsdp: bool = False, min_size: int = 1 << 18) -> tuple[tuple[str, Spec], ...]:
    """Table for the frozen CLIP text / UNet / VAE trees.

    Replicated by default: the decoder is read every step and small decoders fit on each device,
    so replication costs no communication. `fsdp=True` shards every array with >= `min_size`
    elements over 'fsdp' along its largest dividing dim (for decoders too big to replicate; XLA
    then all-gathers them inside the step).
    """
    if not fsdp:
        return ((r".*", P()),)
    return ((r".*", fsdp_largest("fsdp", min_size=min_size)),)


FROZEN_REPLICATED = frozen_rules(fsdp=False)
FROZEN_FSDP = frozen_rules(fsdp=True)


def path_str(keypath: Sequence[Any]) -> str:
    """'/'-joined names of a jax key path (dict keys, attributes, sequence indices)."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _axis_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P | Sequence[MeshAxes], shape: Sequence[int], mesh: Mesh,
             path: str = "") -> P | None:
    """Adapts `spec` to an array: None if it has more entries than dims; otherwise drops mesh axes
    the mesh lacks, axes already used by an earlier dim, and (from the end of a multi-axis entry)
    axes that do not divide the dim. Trailing Nones are stripped (canonical form)."""
    entries = list(spec)
    if len(entries) > len(shape):
        return None
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, entry in enumerate(entries):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept = tuple(a for a in axes if a in mesh.shape and a not in used)
        if kept != axes:
            log.debug("%s: dim %d drops mesh axes %s (absent from mesh or already used)",
                      path, dim, sorted(set(axes) - set(kept)))
        while kept and shape[dim] % _axis_size(mesh, kept):
            log.debug("%s: dim %d (size %d) not divisible by %s (size %d); not sharding it over %r",
                      path, dim, shape[dim], kept, _axis_size(mesh, kept), kept[-1])
            kept = kept[:-1]
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _resolve(spec: Spec, shape: tuple[int, ...], mesh: Mesh,
             logical_rules: LogicalRules) -> P:
    if spec is None:
        return P()
    if isinstance(spec, Logical):
        return logical_to_mesh_spec(spec, logical_rules)
    if isinstance(spec, P):
        return spec
    if callable(spec):
        return spec(shape, mesh)
    raise TypeError(f"unsupported spec {spec!r}: use PartitionSpec, Logical, None or a callable")


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, table: RuleTable,
             logical_rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> P:
    """PartitionSpec for one array: the first rule whose regex fullmatches `path` and fits."""
    shape = tuple(int(s) for s in shape)
    for pattern, spec in table:
        if re.fullmatch(pattern, path):
            fitted = fit_spec(_resolve(spec, shape, mesh, logical_rules), shape, mesh, path)
            if fitted is not None:
                return fitted
            log.debug("%s: rule %r has more entries than the %d dims; trying the next rule",
                      path, pattern, len(shape))
    raise ValueError(
        f"no sharding rule matches {path!r} (shape {shape}); add a catch-all (r'.*', P()) "
        f"to the table to replicate unmatched arrays")


def _is_box(x: Any) -> bool:
    return isinstance(x, flax_meta.Partitioned)


def tree_specs(tree: Any, mesh: Mesh, table: RuleTable,
               logical_rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> Any:
    """Tree of PartitionSpecs matching `tree` (arrays or ShapeDtypeStructs).

    Flax boxes (``nn.with_partitioning`` / ``nn.with_logical_partitioning``) use their own
    annotation instead of the table and are unboxed in the result, matching ``nn.unbox(tree)``.
    """

    def one(keypath, leaf):
        if _is_box(leaf):
            names = leaf.names
            value = leaf.value
            spec = (logical_to_mesh_spec(names, logical_rules)
                    if isinstance(leaf, nn.LogicallyPartitioned) else P(*names))
            fitted = fit_spec(spec, value.shape, mesh, path_str(keypath))
            return fitted if fitted is not None else P()
        shape = getattr(leaf, "shape", ())
        return spec_for(path_str(keypath), shape, mesh, table, logical_rules)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)


def tree_shardings(tree: Any, mesh: Mesh, table: RuleTable,
                   logical_rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> Any:
    """Tree of NamedShardings matching `tree` from a (path regex -> spec) table."""
    specs = tree_specs(tree, mesh, table, logical_rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))
