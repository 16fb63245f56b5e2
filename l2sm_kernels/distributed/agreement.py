"""The ranks' agreement check of the class-parallel loss (docs/reliability.md, case 29): every value
the ranks must pass alike, gathered in one all-gather before any collective whose size depends on them,
and the same clear error on every rank on a mismatch. When it runs (every call on CPU tensors, the first
call per module / group on CUDA) is decided in class_parallel.py (CHECK_EVERY_CALL)."""
from __future__ import annotations

import math
import struct
import zlib

import torch
import torch.distributed as dist

from ..options import FLOAT_DTYPES, MARGIN_GRADS, MARGIN_TYPES, NEGATIVES, REDUCTIONS, L2SMOptions
from .collectives import _all_gather_single

class _Args:
    """The locally validated arguments of one call (_prepare)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


# The values every rank must pass alike, in the order they are gathered: (what, kind, value of _Args).
# kind: "int" (ints and bools), "float" (compared bit for bit), "name" (strings, dtypes, None: compared
# by a CRC-32 of str()), "tensor" (a 0-d tensor, compared bit for bit as float64 on its device: no host
# read). A mismatch in any of them would make the ranks' collectives differ in size or number (gloo
# aborts the process, NCCL reads garbage or hangs), so they are compared before the first collective
# whose size depends on them.
_AGREE = (
    ("the feature dimension D", "int", lambda a: a.D),
    ("the features' dtype", "name", lambda a: a.features.dtype),
    ("weight_shard's dtype", "name", lambda a: a.weight.dtype),
    ("bias_shard (its dtype, or None)", "name", lambda a: None if a.bias is None else a.bias.dtype),
    ("alpha's dtype", "name", lambda a: a.alpha_t.dtype),
    ("normalize_weight", "int", lambda a: a.opts.normalize_weight),
    ("margin_type", "name", lambda a: a.opts.margin_type),
    ("margin", "float", lambda a: _number(a.opts.margin_parts()[0])),
    ("the margin's additive part m3", "float", lambda a: _number(a.opts.margin_parts()[1])),
    ("the margins' forms (m2, m3)", "name", lambda a: _margin_form(a.opts)),
    ("subcenters", "int", lambda a: a.opts.subcenters),
    ("margin_grad", "name", lambda a: a.opts.margin_grad),
    ("ignore_index", "int", lambda a: a.opts.ignore_index),
    ("label_smoothing", "float", lambda a: _number(a.opts.label_smoothing)),
    ("eps", "float", lambda a: a.opts.eps),
    ("reduction", "name", lambda a: a.reduction),
    ("sample_rate", "float", lambda a: a.sample_rate),
    ("grad mode (torch.is_grad_enabled())", "int", lambda a: torch.is_grad_enabled()),
    ("features.requires_grad", "int", lambda a: a.features.requires_grad),
    ("weight_shard.requires_grad", "int", lambda a: a.weight.requires_grad),
    ("bias_shard.requires_grad", "int", lambda a: a.bias is not None and a.bias.requires_grad),
    ("alpha.requires_grad", "int", lambda a: a.alpha_t.requires_grad),
    ("len(batch_sizes) (-1: None)", "int", lambda a: -1 if a.batch_sizes is None else len(a.batch_sizes)),
    ("batch_sizes", "name", lambda a: a.batch_sizes),
    ("alpha", "tensor", lambda a: a.alpha_t),
    ("margin m2 (a 0-d tensor's value)", "tensor", lambda a: _scalar_value(a.opts.margin_parts()[0], a)),
    ("margin m3 (a 0-d tensor's value)", "tensor", lambda a: _scalar_value(a.opts.margin_parts()[1], a)),
    ("label_smoothing (a 0-d tensor's value)", "tensor", lambda a: _scalar_value(a.opts.label_smoothing, a)),
    ("negatives", "name", lambda a: a.opts.negatives),
    ("negatives_t", "float", lambda a: _number(a.opts.negatives_t)),
    ("negatives_t (a 0-d tensor's value)", "tensor", lambda a: _scalar_value(a.opts.negatives_t, a)),
)
_HEAD = ("a local argument error", "the batch size", "class_start", "the shard size")
_FORMS = ("none", "number", "0-d tensor", "per-row tensor")  # how a margin part is given (_form)
_NAMES = {zlib.crc32(str(v).encode()): str(v) for v in
          (*FLOAT_DTYPES, torch.int32, torch.int64, *MARGIN_TYPES, *REDUCTIONS, *MARGIN_GRADS, *NEGATIVES, None,
           *(f"({u}, {v})" for u in _FORMS for v in _FORMS))}


def _form(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, torch.Tensor):
        return "per-row tensor" if v.dim() == 1 else "0-d tensor"
    return "number"


def _margin_form(opts: L2SMOptions) -> str:
    """How the margin's parts are given (a (B,) tensor holds each rank's own rows, so only its form is
    compared; a 0-d tensor's value is compared on the device, numbers bit for bit)."""
    m2, m3 = opts.margin_parts()
    return f"({_form(m2)}, {_form(m3)})"


def _number(v) -> float:
    """A number option as itself, absent (None) as 0, a tensor as NaN (its value is compared apart)."""
    if v is None:
        return 0.0
    return math.nan if isinstance(v, torch.Tensor) else v


def _scalar_value(v, a) -> torch.Tensor:
    """A 0-d tensor option's value for the agreement table (0 for anything else: compared elsewhere)."""
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        return v.detach()
    return torch.zeros((), dtype=torch.float64, device=a.features.device)


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _encode(kind: str, v) -> int:
    if kind == "float":
        return _bits(v)
    if kind == "int" and -2 ** 63 <= int(v) < 2 ** 63:
        return int(v)
    return zlib.crc32(str(v).encode())


def _decode(kind: str, v: int):
    if kind in ("float", "tensor"):
        return struct.unpack("<d", struct.pack("<q", v))[0]
    if kind == "name":
        return _NAMES.get(v, f"<crc32 {v:#010x}>")
    return v


def _check_ranks(a, err, world: int, rank: int, group, device: torch.device) -> int:
    """One all-gather of every rank's layout (batch size, class_start, shard size) and of the values
    in _AGREE, on `device` (the features': gloo and NCCL both carry it); every rank reads the same
    table and raises the same error. A rank whose arguments failed local validation (err) takes part
    with a flag, and every rank raises (the others with its message), instead of leaving the others
    blocked in a collective. Returns C (the shards' union)."""
    host = [1, 0, 0, 0] if a is None else [0, a.B, a.class_start, a.n]
    tensors = [(label, getter) for label, kind, getter in _AGREE if kind == "tensor"]
    host += [0 if a is None else _encode(kind, getter(a)) for label, kind, getter in _AGREE if kind != "tensor"]
    info = torch.tensor(host, dtype=torch.int64).to(device)
    if tensors:
        if a is None:
            bits = torch.zeros(len(tensors), dtype=torch.int64, device=device)
        else:  # on the device: no host read of a CUDA alpha
            bits = torch.stack([getter(a).detach().reshape(()).to(device, torch.float64).view(torch.int64)
                                for _, getter in tensors])
        info = torch.cat([info, bits])
    width = info.numel()
    table = torch.empty(world * width, dtype=torch.int64, device=device)
    _all_gather_single(table, info, group=group)
    rows = table.view(world, width).tolist()  # the one host read (a sync on CUDA)

    failed = [r for r in range(world) if rows[r][0]]
    if failed:
        msgs = [None] * world
        dist.all_gather_object(msgs, None if err is None else (type(err).__name__, str(err)), group=group)
        if err is not None:
            raise err
        name, msg = msgs[failed[0]]
        exc = {"TypeError": TypeError, "ValueError": ValueError}.get(name, RuntimeError)
        raise exc(f"rank {failed[0]} of the group rejected its arguments, so every rank stops: {name}: {msg}")

    kinds = [k for _, k, _ in _AGREE if k != "tensor"] + ["tensor"] * len(tensors)
    labels = [lab for lab, k, _ in _AGREE if k != "tensor"] + [lab for lab, _ in tensors]
    sizes = [r[1] for r in rows]
    for j, (label, kind) in enumerate(zip(labels, kinds), start=len(_HEAD)):
        col = [r[j] for r in rows]
        if len(set(col)) == 1:
            continue
        if label.startswith("len(batch_sizes)") or label == "batch_sizes":
            lens = [r[labels.index("len(batch_sizes) (-1: None)") + len(_HEAD)] for r in rows]
            raise ValueError(f"batch_sizes: the ranks passed different lists (lengths {lens} on ranks 0..{world - 1}, "
                             f"-1: None); pass the same list on every rank (the ranks' batch sizes are {sizes})")
        shown = [_decode(kind, v) for v in col]
        raise ValueError(f"the ranks disagree on {label}: {shown} on ranks 0..{world - 1}; every rank of the group "
                         f"must pass the same")

    # every rank holds the same batch_sizes now
    if a.batch_sizes is not None:
        if sizes != a.batch_sizes:
            raise ValueError(f"batch_sizes must list the {world} ranks' batch sizes: they are {sizes}, "
                             f"got batch_sizes = {a.batch_sizes}")
    elif len(set(sizes)) != 1:
        raise ValueError(f"features: the ranks' batch sizes are {sizes}, expected equal batch sizes "
                         f"(pass batch_sizes for uneven ones)")
    spans = sorted((r[2], r[2] + r[3], i) for i, r in enumerate(rows) if r[3] > 0)
    pos = 0
    for start, end, r in spans:
        if start != pos:
            raise ValueError(
                f"class_start: the ranks' shards [class_start, class_start + n) must tile [0, num_classes) "
                f"without gaps or overlaps; got {[(x[2], x[2] + x[3]) for x in rows]} (rank {r} starts at {start}, "
                f"expected {pos})"
            )
        pos = end
    if pos == 0:
        raise ValueError("weight_shard: the ranks' shards hold no class at all")
    return pos
