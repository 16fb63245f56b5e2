"""The ranks' agreement check of the class-parallel loss (docs/reliability.md, case 29; docs/class_parallel.md,
"The agreement check"): every value the ranks must pass alike, gathered in one all-gather before any
collective whose size depends on them. Two forms:
- the table (_check_ranks): every value in the clear, read on the host, the same error naming what
  differs on every rank; a host sync on CUDA.
- the device check (_check_ranks_on_device): per rank one fixed-size int64 row (a local-error flag,
  the batch size, a 64-bit hash of every other value, the bits of the 0-d tensor values), all-gathered
  and compared on the device; a mismatch fails torch._assert_async on every rank at once (a
  RuntimeError on CPU; on CUDA a device-side assert, which ends the process's CUDA context: an error
  instead of a hang). No host read.
Which one runs when is decided in class_parallel.py (AGREEMENT)."""
from __future__ import annotations

import hashlib
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
    ("overlap_grad_reduce", "int", lambda a: a.overlap),
    ("grad_reduce_dtype", "name", lambda a: a.grad_reduce_dtype),
    ("grad mode (torch.is_grad_enabled())", "int", lambda a: torch.is_grad_enabled()),
    ("features.requires_grad", "int", lambda a: a.features.requires_grad),
    ("weight_shard.requires_grad", "int", lambda a: a.weight.requires_grad),
    ("bias_shard.requires_grad", "int", lambda a: a.bias is not None and a.bias.requires_grad),
    ("alpha.requires_grad", "int", lambda a: a.alpha_t.requires_grad),
    ("len(batch_sizes) (-1: None, -2: 'auto')", "int",
     lambda a: -1 if a.batch_sizes is None else -2 if a.batch_sizes == "auto" else len(a.batch_sizes)),
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
           "auto", "compute", "features",
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


def _check_ranks(a, err, world: int, rank: int, group, device: torch.device) -> tuple[int, list[int]]:
    """One all-gather of every rank's layout (batch size, class_start, shard size) and of the values
    in _AGREE, on `device` (the features': gloo and NCCL both carry it); every rank reads the same
    table and raises the same error. A rank whose arguments failed local validation (err) takes part
    with a flag, and every rank raises (the others with its message), instead of leaving the others
    blocked in a collective. Returns (C (the shards' union), the ranks' batch sizes)."""
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
            lens = [r[labels.index("len(batch_sizes) (-1: None, -2: 'auto')") + len(_HEAD)] for r in rows]
            raise ValueError(f"batch_sizes: the ranks passed different lists (lengths {lens} on ranks 0..{world - 1}, "
                             f"-1: None, -2: 'auto'); pass the same list on every rank (the ranks' batch sizes are "
                             f"{sizes})")
        shown = [_decode(kind, v) for v in col]
        raise ValueError(f"the ranks disagree on {label}: {shown} on ranks 0..{world - 1}; every rank of the group "
                         f"must pass the same")

    # every rank holds the same batch_sizes now
    if a.batch_sizes == "auto":
        pass  # the gathered batch sizes are the layout
    elif a.batch_sizes is not None:
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
    return pos, sizes


# ---------------------------------------------------------------------------------------------
# the device check: no host read
# ---------------------------------------------------------------------------------------------
DEVICE_CHECK_MESSAGE = (
    "l2sm_kernels: the ranks of the class-parallel group disagree in this call: a batch size (with "
    "batch_sizes=None), the batch_sizes lists, an option or its form (a per-row, 0-d tensor or number margin), "
    "alpha, the dtypes, the grad mode or the requires_grad pattern; or one rank's arguments failed its local "
    "checks (that rank raised the reason). Every rank stops here. To see which value differs, set "
    "l2sm_kernels.distributed.class_parallel.AGREEMENT = 'table' (a host sync per call on CUDA) and rerun."
)


def _hash64(values) -> int:
    """A signed 64-bit hash of a sequence of ints (the encoded host values)."""
    h = hashlib.blake2b(b"".join(v.to_bytes(8, "little", signed=True) if -2 ** 63 <= v < 2 ** 63 else
                                 str(v).encode() for v in values), digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=True)


def _device_row(a, err, device: torch.device) -> torch.Tensor:
    """This rank's row of the device check: [local error flag, batch size (0 when batch_sizes lists
    them: the lists are in the hash and each rank checked its own entry), hash of every host value of
    _AGREE, the bits of each 0-d tensor value of _AGREE (on the device)]. Fixed width."""
    tensors = [getter for _, kind, getter in _AGREE if kind == "tensor"]
    if a is None:
        host = [1, 0, 0]
    else:
        vals = [_encode(kind, getter(a)) for _, kind, getter in _AGREE if kind != "tensor"]
        host = [0, a.B if a.batch_sizes is None else 0, _hash64(vals)]
    head = torch.tensor(host, dtype=torch.int64)
    if device.type != "cpu":  # pinned and non_blocking: a pageable copy would wait for the stream
        head = head.pin_memory().to(device, non_blocking=True)
    if a is None:
        bits = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    else:
        bits = torch.stack([getter(a).detach().reshape(()).to(device, torch.float64).view(torch.int64)
                            for getter in tensors])
    return torch.cat([head, bits])


def _check_ranks_on_device(a, err, world: int, group, device: torch.device) -> None:
    """The per-call agreement check without a host read: one all-gather of a fixed-size int64 row per
    rank (3 + 5 values: 64 bytes), compared on the device; every rank sees the same table, so every
    rank fails the same torch._assert_async (on CPU tensors a RuntimeError with DEVICE_CHECK_MESSAGE,
    on CUDA a device-side assert) before any collective whose size depends on the values. A rank
    whose local checks failed (err) takes part with a flag, then raises its own error. Cost: one
    latency-bound collective of world x 64 bytes and three tiny kernels per call."""
    row = _device_row(a, err, device)
    table = torch.empty(world * row.numel(), dtype=torch.int64, device=device)
    _all_gather_single(table, row, group=group)
    table = table.view(world, row.numel())
    bad = (table[:, 0] != 0).any() | (table[:, 1:] != table[:1, 1:]).any()
    if err is not None:
        raise err
    torch._assert_async(~bad, DEVICE_CHECK_MESSAGE)
