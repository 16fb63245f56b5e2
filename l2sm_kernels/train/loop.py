"""The training recipe (docs/training.md): an arcface_torch-style loop on this library's class-parallel head.

    torchrun --standalone --nproc_per_node 2 -m l2sm_kernels.train --output runs/synth      # CPU: gloo; CUDA: NCCL
    python -m l2sm_kernels.train --output runs/synth                                          # one process
    torchrun ... -m l2sm_kernels.train --data /path/to/imagefolder --image-size 112 --backbone iresnet18 \
        --val-bin lfw.bin cfp_fp.bin agedb_30.bin --amp bf16

The backbone is replicated (DistributedDataParallel); the class matrix is sharded over the ranks
(l2sm_kernels.distributed.ClassParallelL2SoftmaxLoss; ArcFace s = 64, m = 0.5 with the detached margin
gradient, as arcface_torch). Every rank's loss is the loss of the global batch, so DDP's gradients are
summed, not averaged (a communication hook). Two optimizers (backbone, head shard) share one schedule:
polynomial decay after a linear warmup (arcface_torch's PolynomialLRWarmup, power 1 by default). Mixed
precision: --amp bf16 (autocast, no scaling) or fp16 (autocast with gradient scaling; across ranks the
scaler agrees on overflow, since one rank's head shard can overflow alone). --accum N micro-batches per
optimizer step. Checkpoints per rank (checkpoint.py) resume at the same or another world size.

The exit is ordered as in l2sm_kernels.demo.class_parallel_training (docs/reliability.md, case 30): train()
returns, every rank passes a barrier, gc.collect(), then destroy_process_group().
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from ..distributed import ClassParallelL2SoftmaxLoss
from ..distributed.class_parallel import shard_sizes
from ..verification import VerificationCallback
from .backbone import BACKBONES, build_backbone
from .checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from .data import ImageFolder, Indexed, SyntheticFaces, flip_table, synthetic_verification_set, train_transform

__all__ = ["main", "parse_args", "lr_at"]

log = logging.getLogger("l2sm_kernels.train")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m l2sm_kernels.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data", default="synthetic", help="'synthetic' or an ImageFolder root (one folder per class)")
    a("--classes", type=int, default=200, help="synthetic: number of classes")
    a("--per-class", type=int, default=20, help="synthetic: images per class")
    a("--image-size", type=int, default=32)
    a("--backbone", default="iresnet-tiny",
      help=f"{', '.join(BACKBONES)}, mlp (no batch norm), 'torchvision:<name>' or 'package.module:callable'")
    a("--embedding-size", type=int, default=128)
    a("--batch-size", type=int, default=64, help="images per rank per micro-batch")
    a("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    a("--epochs", type=float, default=2.0)
    a("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    a("--optimizer", choices=("sgd", "adamw"), default="sgd")
    a("--lr", type=float, default=None, help="default 0.1 (sgd) / 1e-3 (adamw)")
    a("--momentum", type=float, default=0.9)
    a("--weight-decay", type=float, default=5e-4)
    a("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    a("--power", type=float, default=1.0, help="polynomial decay power")
    a("--clip", type=float, default=5.0, help="backbone gradient-norm clip (0: none)")
    a("--amp", choices=("none", "bf16", "fp16"), default="none")
    a("--margin-type", choices=("arcface", "cosface", "combined", "none"), default="arcface")
    a("--margin", type=float, nargs="+", default=None,
      help="default 0.5 (arcface), 0.35 (cosface), 1.0 0.5 0.0 (combined: m1 m2 m3)")
    a("--scale", type=float, default=64.0, help="s (the radius alpha)")
    a("--margin-grad", choices=("detached", "exact"), default="detached")
    a("--sample-rate", type=float, default=1.0, help="Partial FC sampling rate of the head")
    a("--head-backend", default="auto")
    a("--output", default="runs/l2sm_train")
    a("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    a("--resume", action="store_true", help="resume from OUTPUT/checkpoint (any world size)")
    a("--val-bin", nargs="*", default=[], help="InsightFace .bin verification sets")
    a("--val-synthetic", type=int, default=200, help="synthetic data: pairs of a held-out verification set (0: none)")
    a("--val-every", type=int, default=0, help="steps between verifications (0: at the end only)")
    a("--log-every", type=int, default=10)
    a("--probe-batch", type=int, default=12, help="a fixed global batch whose eval-mode loss is logged at "
                                                  "every checkpoint and resume (0: off)")
    a("--seed", type=int, default=0)
    a("--workers", type=int, default=0, help="DataLoader workers per rank")
    a("--threads", type=int, default=0, help="CPU threads per rank (0: cores / ranks)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 0.1 if args.optimizer == "sgd" else 1e-3
    if args.margin is None:
        defaults = {"arcface": [0.5], "cosface": [0.35], "combined": [1.0, 0.5, 0.0], "none": [0.0]}
        args.margin = defaults[args.margin_type]
    for name in ("batch_size", "accum", "image_size", "embedding_size", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    return args


def lr_at(step: int, base: float, warmup: int, total: int, power: float) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup to base over `warmup` steps, then
    base (1 - (step - warmup) / (total - warmup)) ** power (PolynomialLRWarmup's closed form)."""
    if warmup > 0 and step <= warmup:
        return base * step / warmup
    if total <= warmup:
        return base
    return base * max(0.0, 1.0 - (min(step, total) - warmup) / (total - warmup)) ** power


def _sum_gradients(state, bucket):
    """DDP communication hook: the sum of the ranks' gradients (each rank's loss is the global batch's)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def _setup_logging(rank: int, output: str) -> None:
    log.handlers.clear()
    log.propagate = False
    vlog = logging.getLogger("l2sm_kernels.verification")
    vlog.handlers.clear()
    vlog.propagate = False
    if rank != 0:
        log.setLevel(logging.WARNING)
        return
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(output, "training.log"))):
        h.setFormatter(fmt)
        log.addHandler(h)
        vlog.addHandler(h)
    log.setLevel(logging.INFO)
    vlog.setLevel(logging.INFO)


def _init_distributed(cuda: bool):
    """torchrun's environment when present, else a one-rank group on a FileStore (no port, no torchrun).
    Returns the temporary folder to remove afterwards, None, or False when a group existed already (it is
    then used and not destroyed)."""
    backend = "nccl" if cuda else "gloo"
    if dist.is_initialized():  # called from a program that set up its own group: use it, leave it
        return False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        return None
    tmp = tempfile.mkdtemp(prefix="l2sm_train_")
    dist.init_process_group(backend, store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
    return tmp


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda:  # before the process group: NCCL binds each rank to its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tmp = _init_distributed(cuda)
    try:
        summary = train(args, cuda)  # every object that holds the process group lives (and dies) in here
        dist.barrier()  # nobody tears the group down while a peer still talks to it
    finally:
        gc.collect()  # DDP objects sit in reference cycles; their C++ Reducer holds the group
        if tmp is not False:
            dist.destroy_process_group()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        for lg in (log, logging.getLogger("l2sm_kernels.verification")):
            for h in list(lg.handlers):
                lg.removeHandler(h)
                h.close()
    return summary


def _probe_loss(args, dataset, backbone, head, device) -> float | None:
    """The head's loss on a fixed global batch (the first probe_batch images of a seeded permutation, split
    over the ranks), backbone in eval mode: equal at every world size for the same weights."""
    if args.probe_batch <= 0 or args.sample_rate < 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + 99))[:args.probe_batch]
    sizes = shard_sizes(len(idx), world)
    lo = sum(sizes[:rank])
    mine = idx[lo:lo + sizes[rank]].tolist()
    imgs = torch.stack([dataset[i][0] for i in mine]) if mine else \
        torch.empty((0, 3, args.image_size, args.image_size), dtype=torch.uint8)
    y = torch.tensor([dataset[i][1] for i in mine], dtype=torch.int64)
    from ..verification import to_model_input
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        emb = backbone(to_model_input(imgs).to(device)) if mine else \
            torch.empty((0, args.embedding_size), device=device)
        loss = head(emb.float(), y.to(device), batch_sizes=sizes)
    backbone.train(was)
    return float(loss)


def train(args, cuda: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    os.makedirs(args.output, exist_ok=True)
    dist.barrier()
    _setup_logging(rank, args.output)
    torch.manual_seed(args.seed)  # the same backbone initialization on every rank

    if args.data == "synthetic":
        dataset = SyntheticFaces(args.classes, args.per_class, args.image_size, seed=args.seed)
        num_classes = args.classes
    else:
        dataset = ImageFolder(args.data, args.image_size)
        num_classes = dataset.num_classes
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed,
                                                              drop_last=True)
    loader = torch.utils.data.DataLoader(Indexed(dataset), batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers)
    micro_per_epoch = len(loader)
    steps_per_epoch = micro_per_epoch // args.accum
    if steps_per_epoch < 1:
        raise SystemExit(f"{len(dataset)} images give no full optimizer step at {world} ranks x batch "
                         f"{args.batch_size} x accum {args.accum}")
    total = args.steps or max(1, int(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else total // 10

    bare = build_backbone(args.backbone, args.embedding_size, args.image_size).to(device)
    backbone = bare
    if world > 1:  # the backbone only, never the class-parallel head
        # batch-norm statistics stay per rank during training (arcface_torch: broadcast_buffers=False); newer
        # torch spells that forward_sync_buffers=False (it still syncs them once here, which the equal
        # initialization makes harmless)
        import inspect
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})
        backbone = torch.nn.parallel.DistributedDataParallel(bare, device_ids=[device.index] if cuda else None,
                                                             **no_sync)
        backbone.register_comm_hook(None, _sum_gradients)
    margin = args.margin[0] if len(args.margin) == 1 else tuple(args.margin)
    head = ClassParallelL2SoftmaxLoss(args.embedding_size, num_classes, alpha=args.scale, normalize_weight=True,
                                      margin_type=args.margin_type, margin=margin, margin_grad=args.margin_grad,
                                      sample_rate=args.sample_rate, backend=args.head_backend, device=device,
                                      seed=args.seed)

    def make_opt(params):
        params = [p for p in params if p.requires_grad]
        if args.optimizer == "sgd":
            return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    opt_b, opt_h = make_opt(bare.parameters()), make_opt(head.parameters())
    scaler = None
    if args.amp == "fp16":
        if world > 1:  # all-reduces the overflow flag: a head shard may overflow on one rank only
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            scaler = ShardedGradScaler(device=device.type, growth_interval=100)
        else:
            scaler = torch.amp.GradScaler(device.type, growth_interval=100)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    ckpt_dir = os.path.join(args.output, "checkpoint")
    saved_at = -1
    step, epoch, summary = 0, 0, {"world_size": world, "losses": [], "verification": {}}
    if args.resume:
        if not checkpoint_exists(ckpt_dir):
            raise SystemExit(f"--resume: no complete checkpoint in {ckpt_dir}")
        info = load_checkpoint(ckpt_dir, backbone=bare, head=head, opt_backbone=opt_b, opt_head=opt_h, scaler=scaler)
        step, epoch = info["step"], info["epoch"]
        summary["resumed_from"] = info
        summary["probe_loss_resumed"] = _probe_loss(args, dataset, bare, head, device)
        saved_at = step  # nothing new to save until the next step
        log.info(f"resumed step {step} (epoch {epoch}) of a run at world size {info['world_size']}, now "
                 f"{world}; probe loss {summary['probe_loss_resumed']}")

    vsets = {os.path.splitext(os.path.basename(p))[0]: p for p in args.val_bin}
    if args.val_synthetic and args.data == "synthetic" and rank == 0:
        vsets["synthetic_heldout"] = synthetic_verification_set(args.val_synthetic, args.image_size, args.seed,
                                                                first_class=args.classes)
    callback = VerificationCallback(vsets, every=args.val_every or 10 ** 12, batch_size=max(args.batch_size, 64),
                                    nfolds=10, image_size=(args.image_size, args.image_size))

    log.info(f"world {world} ({'nccl' if cuda else 'gloo'}, {device}), {len(dataset)} images, {num_classes} classes "
             f"({head.num_local} on rank 0), global batch {args.batch_size * world} x accum {args.accum}, "
             f"{steps_per_epoch} steps/epoch, {total} steps, warmup {warmup}, {args.optimizer} lr {args.lr:g}, "
             f"amp {args.amp}, head {args.margin_type} s={args.scale:g} m={margin}")
    log.info(f"head: {head}")
    bar = None
    if rank == 0 and not args.no_progress and step < total:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=step, desc="train", unit="step", mininterval=1.0, file=sys.stderr)
        except ImportError:
            bar = None

    def save():
        # every rank takes rank 0's batch-norm statistics, the ones the checkpoint keeps: the run goes on
        # from exactly the state a resumed run starts from
        with torch.no_grad():
            for b in bare.buffers():
                dist.broadcast(b, 0)
        save_checkpoint(ckpt_dir, step=step, epoch=epoch, backbone=bare, head=head, opt_backbone=opt_b,
                        opt_head=opt_h, scaler=scaler, config=vars(args))
        summary["probe_loss_saved"] = _probe_loss(args, dataset, bare, head, device)
        if rank == 0:
            torch.save(bare.state_dict(), os.path.join(args.output, "model.pt"))
        log.info(f"checkpoint at step {step} in {ckpt_dir} (world size {world}); probe loss "
                 f"{summary['probe_loss_saved']}")

    backbone.train()
    running, count, t0, seen = torch.zeros((), device=device), 0, time.time(), 0
    skip = (step % steps_per_epoch) * args.accum  # micro-batches of the resumed epoch already done
    while step < total:
        sampler.set_epoch(epoch)
        flips = flip_table(len(dataset), args.seed, epoch)
        micro = 0
        for micro, (img, y, idx) in enumerate(loader):
            if skip:
                skip -= 1
                continue
            x, y = train_transform(img, flips[idx]).to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = (micro + 1) % args.accum == 0
            sync = contextlib.nullcontext() if (last or world == 1) else backbone.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    emb = backbone(x)
                loss = head(emb, y)  # the global batch's mean loss, on every rank
                scaled = loss / args.accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            running += loss.detach()
            count += 1
            seen += x.shape[0] * world
            if not last:
                continue
            step += 1
            lr = lr_at(step, args.lr, warmup, total, args.power)
            for opt in (opt_b, opt_h):
                for g in opt.param_groups:
                    g["lr"] = lr
            if scaler is not None:
                scaler.unscale_(opt_b)
                scaler.unscale_(opt_h)
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(bare.parameters(), args.clip)
            if scaler is not None:
                scaler.step(opt_b)
                scaler.step(opt_h)
                scaler.update()
            else:
                opt_b.step()
                opt_h.step()
            opt_b.zero_grad(set_to_none=True)
            opt_h.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update(1)
            if step % args.log_every == 0 or step == total:
                avg = float(running) / max(count, 1)  # one host read per log line, not per step
                dt = time.time() - t0
                extra = f"  grad scale {scaler.get_scale():g}" if scaler is not None else ""
                log.info(f"step {step}/{total}  epoch {epoch}  loss {avg:.4f}  lr {lr:.5f}  "
                         f"{seen / max(dt, 1e-9):.1f} images/s{extra}")
                summary["losses"].append((step, avg))
                running.zero_()
                count, t0, seen = 0, time.time(), 0
            if args.val_every and step % args.val_every == 0:
                r = callback(step, bare)
                if r:
                    summary["verification"] = {k: _scalars(v) for k, v in r.items()}
            if args.save_every and step % args.save_every == 0:
                save()
                saved_at = step
            if step >= total:
                break
        if micro + 1 >= micro_per_epoch:
            epoch += 1
    if bar is not None:
        bar.close()
    if saved_at != step:
        save()
    if rank == 0 and callback.sets and not (args.val_every and step % args.val_every == 0):
        r = callback.evaluate(bare, step)
        summary["verification"] = {k: _scalars(v) for k, v in r.items()}
    summary["step"] = step
    if rank == 0:
        with open(os.path.join(args.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log.info(f"done: step {step}, summary in {os.path.join(args.output, 'summary.json')}")
    return summary


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}
