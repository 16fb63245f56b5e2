"""Class-parallel training, end to end: a small embedding network replicated on every rank (DDP)
and the class matrix sharded over the ranks (ClassParallelL2SoftmaxLoss), on synthetic clustered
data. Launch with torchrun (gloo on CPU, NCCL when CUDA is available):

    torchrun --standalone --nproc_per_node 2 -m l2sm_kernels.demo.class_parallel_training
    torchrun --standalone --nproc_per_node 2 -m l2sm_kernels.demo.class_parallel_training --sample-rate 0.3

At the end rank 0 checks the sharded loss against the single-process L2SoftmaxLoss loaded from the
gathered full matrix, on the same global batch.

DDP wraps the backbone only, never the class-parallel head (whose shards differ by rank). Every
rank's loss is the loss of the global batch, so DDP's default average over the ranks would give the
backbone 1/world of its gradient; a communication hook that sums (_sum_gradients) gives it exactly
the single-process gradient of that loss.

The exit is ordered (docs/reliability.md, case 30): train() returns, so every object that holds the
process group from C++ (DDP's Reducer) is unreachable, every rank passes a barrier, gc.collect()
frees what sits in reference cycles, and destroy_process_group() drops the group through its Python
object. Letting the interpreter drop a DDP last instead hung 6 of 20 exits here (this order: 0 of
20): the Reducer's destructor joins gloo's worker thread while holding the GIL that thread waits for.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist

import l2sm_kernels as L
from l2sm_kernels.distributed import ClassParallelL2SoftmaxLoss


def _sum_gradients(state, bucket):
    """DDP communication hook: the sum of the ranks' gradients (DDP's default averages them)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64, help="rows per rank")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--sample-rate", type=float, default=1.0)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:  # the rank's own GPU is the current device before NCCL starts (docs/class_parallel.md)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(args, cuda)  # every object that holds the process group lives (and dies) in here
        dist.barrier()  # nobody tears the group down while a peer still talks to it
    finally:
        gc.collect()  # DDP objects sit in reference cycles; their C++ Reducer holds the group
        dist.destroy_process_group()


def train(args, cuda):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same data distribution and backbone init on every rank
    D_in, D = 64, args.dim
    centers = torch.randn(args.classes, D_in, device=device)
    net = torch.nn.Sequential(torch.nn.Linear(D_in, 128), torch.nn.ReLU(), torch.nn.Linear(128, D)).to(device)
    net = torch.nn.parallel.DistributedDataParallel(net)  # the backbone only: never the head
    net.register_comm_hook(None, _sum_gradients)
    head = ClassParallelL2SoftmaxLoss(D, args.classes, alpha=L.alpha_lower_bound(args.classes), margin_type="cosface",
                                      margin=0.2, normalize_weight=True, sample_rate=args.sample_rate,
                                      backend=args.backend, device=device, seed=0)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.2, momentum=0.9)
    print(f"rank {rank}: {head}", flush=True)
    dist.barrier()
    gen = torch.Generator(device=device).manual_seed(1 + rank)  # each rank draws its own rows
    for step in range(args.steps):
        y = torch.randint(0, args.classes, (args.batch,), device=device, generator=gen)
        x = centers[y] + 0.5 * torch.randn(args.batch, D_in, device=device, generator=gen)
        loss = head(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  global loss {float(loss.detach()):.4f}", flush=True)

    # check: the sharded loss of one global batch == the single-process loss on the full matrix
    y = torch.randint(0, args.classes, (args.batch,), device=device, generator=gen)
    x = centers[y] + 0.5 * torch.randn(args.batch, D_in, device=device, generator=gen)
    with torch.no_grad():
        feats = net(x)
        full = head.full_state_dict()  # a collective: every rank takes part
        check = ClassParallelL2SoftmaxLoss(D, args.classes, alpha=float(head.alpha), margin_type="cosface", margin=0.2,
                                           normalize_weight=True, backend=args.backend, device=device)
        check.load_full_state_dict(full)
        sharded = check(feats, y)  # all classes (no sampling)
        all_feats = [torch.empty_like(feats) for _ in range(world)]
        all_y = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(all_feats, feats)
        dist.all_gather(all_y, y)
    if rank == 0:
        single = L.L2SoftmaxLoss(D, args.classes, alpha=float(head.alpha), margin_type="cosface", margin=0.2,
                                 normalize_weight=True, backend=args.backend, device=device)
        single.load_state_dict(full)
        with torch.no_grad():
            ref = single(torch.cat(all_feats), torch.cat(all_y))
        bg, nbytes = world * args.batch, feats.element_size()
        print(f"world {world}: classes per rank {head.shard_sizes}, global batch {bg}, D {D}")
        print(f"sharded loss {float(sharded):.6f}  single-process loss {float(ref):.6f}  "
              f"|difference| {abs(float(sharded) - float(ref)):.2e}")
        gbytes = 8 if feats.dtype == torch.float64 else 4  # feature gradients are summed in fp32 (fp64)
        print(f"per step: all-gather {bg * D * nbytes / 1024:.1f} KiB of features, reduce-scatter "
              f"{bg * D * gbytes / 1024:.1f} KiB of their gradients; the weight shards "
              f"({head.num_local} x {D} on rank 0) never move")


if __name__ == "__main__":
    main()
