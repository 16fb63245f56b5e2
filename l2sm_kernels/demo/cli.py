"""python -m l2sm_kernels.demo: what the L2-softmax loss buys, measured (see digits.py), and with
--large the large-class mode (see large_classes.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import digits as D
from . import large_classes as LC

TTY_INTERVAL, LOG_INTERVAL = 0.5, 30.0  # progress-bar refresh (s): a terminal vs a log file


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m l2sm_kernels.demo",
        description="Train a small embedding network on scikit-learn's 8x8 digits with the L2-softmax loss "
                    "(l2sm_kernels) and with plain softmax; report closed-set accuracy, open-set verification "
                    "and anomaly-detection AUROC over several seeds. --large: the large-class throughput / "
                    "memory mode instead.",
    )
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    ap.add_argument("--epochs", type=int, default=D.DemoConfig.epochs, help="epochs per run (default %(default)s)")
    ap.add_argument("--geometry-epochs", type=int, default=None, help="epochs of the 2-D runs (default: --epochs)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="radius; default max(alpha_lower_bound(classes), 16) = 16 here (large mode: same rule)")
    ap.add_argument("--normalize-weight", action="store_true", help="also normalize the class weights (NormFace)")
    ap.add_argument("--margin-type", default="none", choices=("none", "cosface", "arcface"))
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--heads", nargs="+", default=list(D.LOSSES), choices=D.LOSSES,
                    help="heads to train and compare (default: all; softmax and l2-softmax are always included)")
    ap.add_argument("--embed-dim", type=int, default=D.DemoConfig.embed_dim)
    ap.add_argument("--holdout", type=int, default=D.DemoConfig.holdout, help="digit classes held out of training")
    ap.add_argument("--k", type=int, default=D.DemoConfig.k, help="neighbours of the kNN anomaly score")
    ap.add_argument("--lr", type=float, default=D.DemoConfig.lr)
    ap.add_argument("--backend", default="auto", choices=("auto", "eager", "cpu", "triton"))
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads; default 1 for the digits runs (their ops are too small to share "
                         "profitably), torch's default for --large")
    ap.add_argument("--out", default="results/demo", help="folder for the PNGs and results.json")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    g = ap.add_argument_group("large-class mode")
    g.add_argument("--large", action="store_true", help="run the large-class mode instead")
    g.add_argument("--classes", type=int, default=None, help="default 100,000 (CPU) / 262,144 (CUDA)")
    g.add_argument("--batch", type=int, default=None, help="default 128 (CPU) / 512 (CUDA)")
    g.add_argument("--dim", type=int, default=None, help="embedding dimension, default 64 (CPU) / 512 (CUDA)")
    g.add_argument("--steps", type=int, default=None, help="default 100 (CPU) / 300 (CUDA)")
    return ap.parse_args(argv)


def _bar(total, enabled):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # in a log file: a line every 30 s, no refreshes by tqdm's monitor thread
    return tqdm(total=total, unit="epoch", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=TTY_INTERVAL if tty else LOG_INTERVAL, maxinterval=10.0 if tty else 1e9)


def run_digits(cfg: D.DemoConfig, seeds, device, out: Path | None, geometry_epochs=None, progress=True) -> dict:
    """Every seed: both losses at cfg.embed_dim; then one 2-D run of each (the geometry figure).
    Returns the per-seed metrics, their summary, and (when out is given) the figure paths."""
    geometry_epochs = cfg.epochs if geometry_epochs is None else geometry_epochs
    n_geometry = geometry_runs(out, geometry_epochs)
    bar = _bar(total_epochs(cfg, len(seeds), n_geometry, geometry_epochs), progress)
    per_seed = {loss: {m: [] for m in D.METRICS} for loss in cfg.heads}
    holdouts, first_raw, first_metrics = [], {}, {}

    def on_epoch(loss_value):
        bar.update(1)
        bar.set_postfix_str(f"loss {loss_value:.3f}", refresh=False)

    for i, seed in enumerate(seeds):
        split = D.load_split(seed, cfg.holdout, cfg.test_fraction).to(device)
        holdouts.append(split.unknown_classes)
        for loss in cfg.heads:
            bar.set_description(f"seed {seed} {loss}", refresh=False)
            t = D.train(loss, split, cfg, seed, on_epoch)
            metrics, raw = D.evaluate(t, split, cfg.k)
            for m in D.METRICS:
                per_seed[loss][m].append(metrics[m])
            if i == 0:
                first_raw[loss], first_metrics[loss] = raw, metrics
    result = {"per_seed": per_seed, "summary": D.summarize(per_seed), "holdout_classes": holdouts,
              "num_known": 10 - cfg.holdout, "figures": {}}
    if out is not None:
        from . import plots

        out.mkdir(parents=True, exist_ok=True)
        title = (f"score distributions, seed {seeds[0]}: held-out digits {', '.join(map(str, holdouts[0]))}, "
                 f"embedding dim {cfg.embed_dim}")
        shown = [loss for loss in cfg.heads if loss in ("softmax", "l2-softmax", "arcface")]
        result["figures"]["scores"] = str(plots.plot_scores({k: first_raw[k] for k in shown},
                                                            {k: first_metrics[k] for k in shown},
                                                            out / "scores.png", title))
        if n_geometry:
            cfg2 = D.DemoConfig(**{**cfg.__dict__, "embed_dim": 2, "epochs": geometry_epochs})
            split = D.load_split(seeds[0], cfg.holdout, cfg.test_fraction).to(device)
            runs = {}
            for loss in GEOMETRY_LOSSES:
                bar.set_description(f"2-D {loss}", refresh=False)
                t = D.train(loss, split, cfg2, seeds[0], on_epoch)
                f_test = D.embed(t.net, split.x_test)
                acc = (D.predict_logits(t.head, f_test).argmax(1) == split.y_test).float().mean()
                runs[loss] = {
                    "features": f_test.cpu().numpy(), "labels": split.y_test.cpu().numpy(),
                    "unknown": D.embed(t.net, split.x_unknown).cpu().numpy(),
                    "weight": t.head.weight.detach().cpu().numpy(), "accuracy": float(acc),
                    "alpha": cfg2.resolved_alpha(split.num_known), "known_classes": split.known_classes,
                    "unknown_classes": split.unknown_classes,
                }
            result["figures"]["geometry"] = str(plots.plot_geometry(runs, out / "geometry.png"))
            result["geometry_accuracy"] = {loss: r["accuracy"] for loss, r in runs.items()}
    bar.close()
    return result


GEOMETRY_LOSSES = ("softmax", "l2-softmax")  # the 2-D figure compares these two


def geometry_runs(out, geometry_epochs) -> int:
    return len(GEOMETRY_LOSSES) if out is not None and geometry_epochs > 0 else 0


def total_epochs(cfg: D.DemoConfig, seeds: int, n_geometry: int, geometry_epochs: int) -> int:
    """What the progress bar counts: every head of every seed, then the 2-D runs of the figure."""
    return seeds * len(cfg.heads) * cfg.epochs + n_geometry * geometry_epochs


def format_table(result: dict, cfg: D.DemoConfig) -> str:
    """A row group per head: each metric's mean ± std over the seeds, the paired difference from softmax
    (same seeds, same batches) and the seeds where the head beats softmax."""
    s, n = result["summary"], len(result["per_seed"]["softmax"]["accuracy"])
    head = f"{'head':18s}{'metric':42s}{'mean ± std':>16s}{'vs softmax':>17s}{'better':>8s}"
    lines = [head, "-" * len(head)]

    def pm(mean, std, sign=""):  # no spread from a single seed
        return f"{mean:{sign}.3f} ± {std:.3f}" if n > 1 else f"{mean:{sign}.3f}        "

    for loss in cfg.heads:
        for i, m in enumerate(D.METRICS):
            name = D.HEAD_NAMES[loss] if i == 0 else ""
            if loss == "softmax":
                vs = better = ""
            else:
                d = s["diff"][loss][m]
                vs, better = pm(d[0], d[1], "+"), f"{d[2]}/{d[3]}"
            lines.append(f"{name:18s}{D.METRIC_NAMES[m]:42s}{pm(*s[loss][m]):>16s}{vs:>17s}{better:>8s}")
    spread = "mean ± sample std" if n > 1 else "one seed, no spread"
    lines.append(f"{spread} over {n} seed(s); 'vs softmax' is the per-seed paired difference; "
                 f"'better': seeds where it is > 0.")
    return "\n".join(lines)


def _header(cfg: D.DemoConfig, args, device, num_known):
    backend, why = LC.backend_used(cfg.backend, device)
    geo_epochs = cfg.epochs if args.geometry_epochs is None else args.geometry_epochs
    n_geo = geometry_runs(None if args.no_plots else Path(args.out), geo_epochs)
    alpha = cfg.resolved_alpha(num_known)
    margin = f", margin_type={cfg.margin_type}, margin={cfg.margin:g}" if cfg.margin_type != "none" else ""
    return "\n".join([
        f"l2sm_kernels demo: scikit-learn 8x8 digits (1797 images, bundled), {num_known} training classes, "
        f"{cfg.holdout} held out per seed (open set / anomalies)",
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"L2-softmax: alpha={alpha:g}, normalize_weight={cfg.normalize_weight}{margin}, "
        f"backend {cfg.backend!r} -> {backend}" + (f" ({why})" if why else ""),
        f"heads: {', '.join(D.HEAD_NAMES[h] for h in cfg.heads)} (margin heads at s = alpha = {alpha:g})",
        f"{args.seeds} seed(s) x {len(cfg.heads)} heads x {cfg.epochs} epochs"
        + (f" + {n_geo} 2-D runs x {geo_epochs} epochs (the geometry figure)" if n_geo else "")
        + f" = {total_epochs(cfg, args.seeds, n_geo, geo_epochs)} epochs; embedding dim {cfg.embed_dim}, kNN k={cfg.k}",
    ])


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.tolist()  # numpy scalar -> Python scalar
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def main(argv=None) -> dict:
    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep theirs


def _main(args) -> dict:
    device = pick_device(args.device)
    out = Path(args.out)
    start = time.time()
    if args.large:
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = LC.default_large_config(device, classes=args.classes, batch=args.batch, dim=args.dim,
                                      steps=args.steps, alpha=args.alpha, backend=args.backend)
        res = LC.run_large(cfg, device, progress=not args.no_progress)
        res["wall_s"] = time.time() - start
        out.mkdir(parents=True, exist_ok=True)
        (out / "large_classes.json").write_text(json.dumps(res, indent=1, default=_json_default))
        print(LC.format_large(res))
        print(f"wall time {res['wall_s']:.0f} s; numbers in {out / 'large_classes.json'}")
        return res

    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    cfg = D.DemoConfig(epochs=args.epochs, embed_dim=args.embed_dim, holdout=args.holdout, alpha=args.alpha,
                       normalize_weight=args.normalize_weight, margin_type=args.margin_type, margin=args.margin,
                       k=args.k, lr=args.lr, backend=args.backend,
                       heads=tuple(h for h in D.LOSSES if h in set(args.heads) | {"softmax", "l2-softmax"}))
    print(_header(cfg, args, device, 10 - cfg.holdout), flush=True)
    result = run_digits(cfg, list(range(args.seeds)), device, None if args.no_plots else out,
                        args.geometry_epochs, progress=not args.no_progress)
    result.update(config=cfg.__dict__, device=str(device), torch=torch.__version__,
                  backend=LC.backend_used(cfg.backend, device)[0], wall_s=time.time() - start)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json_default))
    for name, path in result["figures"].items():
        print(f"{name:9s} {path}")
    print(f"held-out digits per seed: {', '.join(''.join(map(str, h)) for h in result['holdout_classes'])}; "
          f"numbers in {out / 'results.json'}; wall time {result['wall_s']:.0f} s")
    print()
    print(format_table(result, cfg))
    return result
