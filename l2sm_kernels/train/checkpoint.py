"""Checkpoints of the training recipe: one file per rank (its head shard and the head optimizer's state
for it; rank 0's file also holds the backbone and its optimizer), then a marker written by rank 0 after
every rank has saved, so a partly written checkpoint is never resumed. Resuming at another world size
re-splits the head: the shards (and every optimizer tensor shaped like a shard) are concatenated in rank
order, which is the full class matrix since shards are contiguous, and each rank takes its rows."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_exists"]

FORMAT = "l2sm_kernels.train/1"
MARKER = "checkpoint_done.pt"


def _rank_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"checkpoint_rank{rank}.pt")


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_exists(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, MARKER))


def save_checkpoint(folder: str, *, step: int, epoch: int, backbone, head, opt_backbone, opt_head, scaler,
                    config: dict) -> None:
    """A collective: every rank writes its file, then rank 0 writes the marker."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(folder, exist_ok=True)
    if rank == 0 and os.path.exists(os.path.join(folder, MARKER)):
        os.remove(os.path.join(folder, MARKER))
    dist.barrier()
    state = {"format": FORMAT, "world_size": world, "rank": rank, "step": step, "epoch": epoch,
             "num_classes": head.num_classes, "class_start": head.class_start, "num_local": head.num_local,
             "head": head.state_dict(), "head_optimizer": opt_head.state_dict(), "config": config}
    if rank == 0:
        state["backbone"] = backbone.state_dict()
        state["backbone_optimizer"] = opt_backbone.state_dict()
        state["scaler"] = scaler.state_dict() if scaler is not None else None
    _atomic_save(state, _rank_file(folder, rank))
    dist.barrier()
    if rank == 0:
        _atomic_save({"format": FORMAT, "world_size": world, "step": step}, os.path.join(folder, MARKER))
    dist.barrier()


def _load(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def _reshard_optimizer(states: list[dict], mine: dict, shard_rows: list[int], lo: int, hi: int) -> dict:
    """The head optimizer's state_dict for rows [lo, hi) of the full matrix, from the old ranks' state_dicts:
    tensors with one row per old shard row are concatenated and sliced; anything else (step counts) is
    taken from old rank 0."""
    out = {"param_groups": mine["param_groups"], "state": {}}
    keys = set().union(*(s["state"].keys() for s in states))
    for p in keys:
        per = [s["state"].get(p) for s in states]
        if any(v is None for v in per):  # some old rank never stepped this parameter: start it afresh
            continue
        entry = {}
        for k, v0 in per[0].items():
            vals = [v[k] for v in per]
            per_row = all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n
                          for v, n in zip(vals, shard_rows))
            if per_row:
                entry[k] = torch.cat(vals)[lo:hi].clone()
            else:
                entry[k] = v0.clone() if isinstance(v0, torch.Tensor) else v0
        out["state"][p] = entry
    return out


def load_checkpoint(folder: str, *, backbone, head, opt_backbone, opt_head, scaler) -> dict:
    """Load the checkpoint in `folder` at the current world size (the same or another). Returns
    {"step", "epoch", "world_size" (the checkpoint's)}. Each rank reads rank 0's file and its own (same
    world size) or every old rank's file (another world size: at a million classes, read them with
    torch.load(..., mmap=True) instead; here they are small)."""
    marker = os.path.join(folder, MARKER)
    if not os.path.exists(marker):
        raise FileNotFoundError(f"{folder}: no complete checkpoint ({MARKER} is missing)")
    meta = torch.load(marker, map_location="cpu", weights_only=True)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{marker}: not a checkpoint of l2sm_kernels.train (format {meta.get('format')!r})")
    old_world, rank, world = int(meta["world_size"]), dist.get_rank(), dist.get_world_size()
    r0 = _load(_rank_file(folder, 0))
    if r0["num_classes"] != head.num_classes or r0["step"] != meta["step"]:
        raise ValueError(f"{_rank_file(folder, 0)}: {r0['num_classes']} classes at step {r0['step']}, expected "
                         f"{head.num_classes} classes at step {meta['step']}")
    backbone.load_state_dict(r0["backbone"])
    opt_backbone.load_state_dict(r0["backbone_optimizer"])
    if scaler is not None and r0.get("scaler") is not None:
        scaler.load_state_dict(r0["scaler"])
    if old_world == world:
        own = r0 if rank == 0 else _load(_rank_file(folder, rank))
        if own["step"] != meta["step"] or own["class_start"] != head.class_start or own["num_local"] != head.num_local:
            raise ValueError(f"{_rank_file(folder, rank)}: shard [{own['class_start']}, +{own['num_local']}) at step "
                             f"{own['step']} does not match this rank's [{head.class_start}, +{head.num_local}) at "
                             f"step {meta['step']}")
        head.load_state_dict(own["head"])
        opt_head.load_state_dict(own["head_optimizer"])
    else:
        files = [r0] + [_load(_rank_file(folder, r)) for r in range(1, old_world)]
        for r, f in enumerate(files):
            if f["step"] != meta["step"] or f["rank"] != r or f["world_size"] != old_world:
                raise ValueError(f"{_rank_file(folder, r)}: rank {f['rank']} of {f['world_size']} at step {f['step']}, "
                                 f"expected rank {r} of {old_world} at step {meta['step']}")
        K = head.options.subcenters
        full = {"weight": torch.cat([f["head"]["weight"] for f in files])}
        if "bias" in files[0]["head"]:
            full["bias"] = torch.cat([f["head"]["bias"] for f in files])
        if "alpha" in files[0]["head"]:
            full["alpha"] = files[0]["head"]["alpha"]
        head.load_full_state_dict(full)
        rows = [f["num_local"] * K for f in files]
        lo, hi = head.class_start * K, (head.class_start + head.num_local) * K
        opt_head.load_state_dict(_reshard_optimizer([f["head_optimizer"] for f in files], opt_head.state_dict(),
                                                    rows, lo, hi))
    return {"step": int(meta["step"]), "epoch": int(r0["epoch"]), "world_size": old_world}
