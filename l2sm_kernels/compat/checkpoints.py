"""arcface_torch's per-rank head checkpoints: read at any world size, load into this library's modules,
write back in their layout (docs/arcface_torch.md, "Checkpoints").

Their three historical forms, one file per rank r of N, each holding the rank's contiguous shard of
the (C, D) class matrix (their layout: rank r has C // N + (r < C % N) classes, in rank order):
    "raw"         rank:{r}_softmax_weight.pt     the shard as a tensor (2021; rank:{r}_softmax_weight_mom.pt
                                                 beside it: its SGD momentum, resharded alike)
    "state_dict"  softmax_fc_gpu_{r}.pt          the head's state_dict {"weight": shard} (2022)
    "checkpoint"  checkpoint_gpu_{r}.pt          {"epoch", "global_step", "state_dict_backbone",
                                                 "state_dict_softmax_fc": {"weight": shard}, "state_optimizer",
                                                 "state_lr_scheduler"} (2023 on)
Changing the world size is concatenating the shards in rank order and splitting again. Every file is
read with torch.load(weights_only=True) (a pickle that would run code is refused, naming the file) and
memory-mapped, so a rank reads only the rows it keeps.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field

import torch

__all__ = ["FORMS", "HeadCheckpoint", "find_checkpoint", "load_into", "read_rows", "reshard", "save_rank",
           "save_shards", "shard_layout"]

FORMS = {"raw": "rank:{rank}_softmax_weight.pt", "state_dict": "softmax_fc_gpu_{rank}.pt",
         "checkpoint": "checkpoint_gpu_{rank}.pt"}
_MOMENTUM = "rank:{rank}_softmax_weight_mom.pt"


def shard_layout(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """Their split: (class_start, num_local) of every rank."""
    q, rem = divmod(num_classes, world_size)
    return [(q * r + min(r, rem), q + (r < rem)) for r in range(world_size)]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be what it claims (the message names the file)."""


def _load(path: str):
    """torch.load(weights_only=True), memory-mapped where the file format allows it; any failure is a
    CheckpointError naming the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]  # a class or function
        if not why:
            raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: {str(e).splitlines()[0]}") from None
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): it holds more than tensors and "
                              f"plain containers (e.g. code to run): {why[0]}") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: {e}") from None


def _shard_of(obj, path: str, form: str) -> torch.Tensor:
    """The (num_local, D) weight shard inside a loaded file of `form`."""
    if form == "checkpoint":
        if not isinstance(obj, dict) or "state_dict_softmax_fc" not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: not an arcface_torch training checkpoint (no 'state_dict_softmax_fc'; "
                                  f"found {keys})")
        obj = obj["state_dict_softmax_fc"]
    if form in ("checkpoint", "state_dict"):
        if not isinstance(obj, dict) or "weight" not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: not a Partial FC state_dict (no 'weight'; found {keys})")
        extra = sorted(k for k in obj if k != "weight")
        if extra:
            raise CheckpointError(f"{path}: a state_dict with more than the Partial FC head's 'weight' ({extra}): "
                                  "a file of another model?")
        obj = obj["weight"]
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or not obj.is_floating_point():
        what = f"a tensor of shape {tuple(obj.shape)} ({obj.dtype})" if isinstance(obj, torch.Tensor) else \
            type(obj).__name__
        raise CheckpointError(f"{path}: the head's weight must be a 2-D floating tensor (num_local, "
                              f"embedding_size), got {what}")
    return obj


@dataclass
class HeadCheckpoint:
    """One per-rank checkpoint set: its form, its files in rank order, each shard's row count, and D."""

    form: str
    files: list[str]
    sizes: list[int]
    embedding_size: int
    dtype: torch.dtype
    momentum_files: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    @property
    def world_size(self) -> int:
        return len(self.files)

    def check_num_classes(self, num_classes: int, what: str = "the module") -> None:
        if num_classes != self.num_classes:
            raise CheckpointError(
                f"{self.files[0]} ...: the {self.world_size} files hold {self.num_classes} classes "
                f"({self.sizes}), {what} has {num_classes} (a missing last rank, or a checkpoint of another model)")


def find_checkpoint(directory: str, form: str | None = None, num_classes: int | None = None) -> HeadCheckpoint:
    """The per-rank head files in `directory` (form None: whichever of the three is there; two forms in
    one directory is an error unless `form` picks one). Checked: ranks 0 .. N-1 all present, every shard
    2-D with the same D and dtype, the row counts their layout for N ranks (and num_classes, if given)."""
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    names = os.listdir(directory)
    found = {}
    for f, pattern in FORMS.items():
        rx = re.compile("^" + re.escape(pattern).replace(re.escape("{rank}"), r"(\d+)") + "$")
        ranks = {int(m.group(1)): n for n in names if (m := rx.match(n))}
        if ranks:
            found[f] = ranks
    if form is None:
        if not found:
            raise CheckpointError(f"{directory}: no arcface_torch head checkpoint "
                                  f"({', '.join(p.format(rank='N') for p in FORMS.values())})")
        if len(found) > 1:
            raise CheckpointError(f"{directory}: holds head files of several forms ({sorted(found)}); pass form=")
        form = next(iter(found))
    ranks = found.get(form, {})
    if not ranks:
        raise CheckpointError(f"{directory}: no {FORMS[form].format(rank='N')} files")
    N = max(ranks) + 1
    missing = [os.path.join(directory, FORMS[form].format(rank=r)) for r in range(N) if r not in ranks]
    if missing:
        raise CheckpointError(f"{missing[0]}: missing (ranks {sorted(ranks)} of {N} are there)")
    files = [os.path.join(directory, ranks[r]) for r in range(N)]
    sizes, D, dtype = [], None, None
    for path in files:
        w = _shard_of(_load(path), path, form)
        if D is None:
            D, dtype = w.shape[1], w.dtype
        elif w.shape[1] != D or w.dtype != dtype:
            raise CheckpointError(f"{path}: shard of shape {tuple(w.shape)} ({w.dtype}) does not match rank 0's "
                                  f"(*, {D}) ({dtype}): a file of another model?")
        sizes.append(w.shape[0])
        del w
    C = sum(sizes)
    expect = [n for _, n in shard_layout(C, N)]
    if sizes != expect:
        r = next(i for i in range(N) if sizes[i] != expect[i])
        raise CheckpointError(f"{files[r]}: {sizes[r]} classes, but {C} classes over {N} ranks give rank {r} "
                              f"{expect[r]} (shard sizes {sizes}): not one model's shards")
    ck = HeadCheckpoint(form, files, sizes, D, dtype)
    if form == "raw":
        mom = [os.path.join(directory, _MOMENTUM.format(rank=r)) for r in range(N)]
        if any(os.path.exists(p) for p in mom):
            absent = [p for p in mom if not os.path.exists(p)]
            if absent:
                raise CheckpointError(f"{absent[0]}: missing (other ranks have their momentum file)")
            ck.momentum_files = mom
    if num_classes is not None:
        ck.check_num_classes(num_classes, "the caller")
    return ck


def read_rows(ck: HeadCheckpoint, start: int, stop: int, files: list[str] | None = None, form: str | None = None
              ) -> torch.Tensor:
    """Rows [start, stop) of the full (C, D) matrix, reading only the shards that overlap them."""
    files, form = files or ck.files, form or ck.form
    if not 0 <= start <= stop <= ck.num_classes:
        raise ValueError(f"rows [{start}, {stop}) outside the checkpoint's {ck.num_classes} classes")
    pieces, first = [], 0
    for path, n in zip(files, ck.sizes):
        a, b = max(start, first), min(stop, first + n)
        if a < b:
            w = _shard_of(_load(path), path, form)
            if w.shape[0] != n:
                raise CheckpointError(f"{path}: {w.shape[0]} rows, the weight file of this rank has {n}")
            pieces.append(w[a - first: b - first].clone())
        first += n
    if not pieces:
        return torch.empty(0, ck.embedding_size, dtype=ck.dtype)
    return torch.cat(pieces)


def _target_rows(module) -> tuple[int, int, int, int]:
    """(num_classes, class_start, num_local, embedding_size) of this library's head modules."""
    from ..options import L2SMOptions

    opts = getattr(module, "options", None)
    if isinstance(opts, L2SMOptions) and opts.subcenters != 1:
        raise ValueError(f"{type(module).__name__} has subcenters={opts.subcenters}: arcface_torch's heads have "
                         "one row per class")
    if hasattr(module, "class_start") and hasattr(module, "num_local"):  # PartialFC_V2, ClassParallelL2SoftmaxLoss
        D = getattr(module, "embedding_size", None) or module.in_features
        return module.num_classes, module.class_start, module.num_local, D
    if hasattr(module, "in_features") and hasattr(module, "num_classes"):  # L2SoftmaxLoss and the heads
        return module.num_classes, 0, module.num_classes, module.in_features
    raise TypeError(f"load_into takes PartialFC_V2, L2SoftmaxLoss (or a head) or ClassParallelL2SoftmaxLoss, "
                    f"got {type(module).__name__}")


@torch.no_grad()
def load_into(module, source, form: str | None = None) -> HeadCheckpoint:
    """Copy the rows this module holds from a per-rank checkpoint (a directory, or a HeadCheckpoint) into
    module.weight: the compat PartialFC_V2 and ClassParallelL2SoftmaxLoss take their shard (any world
    size, whatever the checkpoint's), L2SoftmaxLoss and the heads take all C rows. Only the weight is
    loaded (theirs has nothing else); the module's options, alpha and bias are left as they are, so
    build it with normalize_weight=True and their margin and scale. Returns the HeadCheckpoint."""
    C, start, n, D = _target_rows(module)
    ck = source if isinstance(source, HeadCheckpoint) else find_checkpoint(source, form)
    ck.check_num_classes(C, f"{type(module).__name__}")
    if ck.embedding_size != D:
        raise CheckpointError(f"{ck.files[0]}: embedding size {ck.embedding_size}, {type(module).__name__} has {D}")
    rows = read_rows(ck, start, start + n)
    module.weight.copy_(rows)
    return ck


def save_shards(weight: torch.Tensor, directory: str, world_size: int, form: str = "state_dict",
                momentum: torch.Tensor | None = None, extras: list[dict] | None = None) -> list[str]:
    """Write the full (C, D) `weight` as `world_size` files of `form` in their layout (their names).
    momentum: the matching (C, D) SGD momentum (raw form: the _mom.pt files; checkpoint form: put in
    extras' state_optimizer by reshard). extras (checkpoint form): the other entries of each rank's
    file (epoch, global_step, backbone, optimizer, scheduler). Returns the paths."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be the full (num_classes, embedding_size) matrix")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for r, (start, n) in enumerate(shard_layout(weight.shape[0], world_size)):
        shard = weight[start: start + n].detach().clone().contiguous()
        path = os.path.join(directory, FORMS[form].format(rank=r))
        if form == "raw":
            torch.save(shard, path)
            if momentum is not None:
                torch.save(momentum[start: start + n].detach().clone().contiguous(),
                           os.path.join(directory, _MOMENTUM.format(rank=r)))
        elif form == "state_dict":
            torch.save({"weight": shard}, path)
        else:
            entry = dict(extras[r]) if extras else {}
            entry["state_dict_softmax_fc"] = {"weight": shard}
            torch.save(entry, path)
        paths.append(path)
    return paths


@torch.no_grad()
def save_rank(module, directory: str, form: str = "state_dict", **training_state) -> str:
    """Write this rank's file of `form` from a module holding their layout's shard for its world size
    (the compat PartialFC_V2, a ClassParallelL2SoftmaxLoss with the default split, or a single-process
    module as rank 0 of 1): each rank calls it for its own file, nothing is gathered. The checkpoint
    form takes the other entries of their file as keywords (epoch=, global_step=,
    state_dict_backbone=, state_optimizer=, state_lr_scheduler=). Returns the path."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    if training_state and form != "checkpoint":
        raise ValueError(f"training state ({sorted(training_state)}) goes only into the 'checkpoint' form")
    C, start, n, _ = _target_rows(module)
    world, rank = getattr(module, "world_size", 1), getattr(module, "rank", 0)
    if (start, n) != shard_layout(C, world)[rank]:
        raise ValueError(f"{type(module).__name__} on rank {rank} holds classes [{start}, {start + n}), their layout "
                         f"for {world} ranks gives {shard_layout(C, world)[rank]}: save the full matrix with "
                         "save_shards instead")
    os.makedirs(directory, exist_ok=True)
    shard = module.weight.detach().clone()
    path = os.path.join(directory, FORMS[form].format(rank=rank))
    if form == "raw":
        torch.save(shard, path)
    elif form == "state_dict":
        torch.save({"weight": shard}, path)
    else:
        torch.save({**training_state, "state_dict_softmax_fc": {"weight": shard}}, path)
    return path


def _head_param_index(optimizer_state: dict):
    """Their optimizer has the backbone's parameters, then the head's weight alone in the last
    param group: its index in state_optimizer["state"] (None if that is not the layout)."""
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    if not groups or len(groups[-1].get("params", ())) != 1:
        return None
    return groups[-1]["params"][0]


def reshard(src: str, dst: str, world_size: int, form: str | None = None, out_form: str | None = None,
            num_classes: int | None = None) -> list[str]:
    """Read the per-rank files in `src` (N of them) and write `world_size` files to `dst` (their names, the
    same form unless out_form). The checkpoint form keeps rank 0's epoch, global_step, backbone and
    scheduler on every rank (DDP keeps those equal across ranks) and reshards the optimizer state of the
    head's weight (momentum, Adam moments: every per-class tensor of the last param group) with it;
    the raw form reshards the _mom.pt files. Reads the whole matrix (C x D) once."""
    ck = find_checkpoint(src, form, num_classes)
    out_form = out_form or ck.form
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if os.path.abspath(src) == os.path.abspath(dst) and out_form == ck.form:
        raise ValueError("dst must differ from src (the files would overwrite the ones being read)")
    full = read_rows(ck, 0, ck.num_classes)
    momentum = read_rows(ck, 0, ck.num_classes, ck.momentum_files, "raw") if ck.momentum_files else None
    extras = None
    if ck.form == "checkpoint" and out_form == "checkpoint":
        extras = _reshard_training_state(ck, world_size)
    return save_shards(full, dst, world_size, out_form, momentum, extras)


def _reshard_training_state(ck: HeadCheckpoint, world_size: int) -> list[dict]:
    """Each new rank's non-head entries of a checkpoint_gpu file (see reshard)."""
    states = [_load(p) for p in ck.files]
    base = {k: v for k, v in states[0].items() if k != "state_dict_softmax_fc"}
    opt = base.get("state_optimizer")
    idx = _head_param_index(opt) if opt is not None else None
    per_class = {}
    if idx is not None:
        for key, v in opt["state"].get(idx, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == ck.sizes[0] and \
                    v.shape[1:] == (ck.embedding_size,):
                parts = []
                for path, st, n in zip(ck.files, states, ck.sizes):
                    t = st["state_optimizer"]["state"].get(idx, {}).get(key)
                    if not isinstance(t, torch.Tensor) or t.shape[0] != n:
                        raise CheckpointError(f"{path}: the head's optimizer state {key!r} does not match its "
                                              f"shard ({n} rows)")
                    parts.append(t)
                per_class[key] = torch.cat(parts)
    out = []
    for start, n in shard_layout(ck.num_classes, world_size):
        entry = dict(base)
        if per_class:
            o = dict(opt)
            o["state"] = dict(opt["state"])
            o["state"][idx] = dict(opt["state"][idx])
            for key, full in per_class.items():
                o["state"][idx][key] = full[start: start + n].clone()
            entry["state_optimizer"] = o
        out.append(entry)
    return out
