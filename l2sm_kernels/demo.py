"""The main job (placeholder until the real demo lands): train a small embedding network for a few
steps with L2SoftmaxLoss on synthetic clustered data and print the loss."""
import argparse

import torch

import l2sm_kernels as L


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    D_in, D = 32, 16
    centers = torch.randn(args.classes, D_in)
    net = torch.nn.Sequential(torch.nn.Linear(D_in, 64), torch.nn.ReLU(), torch.nn.Linear(64, D))
    head = L.L2SoftmaxLoss(D, args.classes, alpha=L.alpha_lower_bound(args.classes), backend=args.backend)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    print(head)
    for step in range(args.steps):
        y = torch.randint(0, args.classes, (128,))
        x = centers[y] + 0.5 * torch.randn(128, D_in)
        loss = head(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(loss):.4f}")


if __name__ == "__main__":
    main()
