"""Large-class mode: train on synthetic identities (100k+ classes) with l2sm_kernels' op
(backend "auto") and with the plain torch formula (l2sm_kernels.reference.plain_formula:
F.cross_entropy(alpha * F.normalize(x) @ W.T, y), which builds the B x C logits), side by side:
same model, same initialization, same batches. Reports step time, throughput and peak memory,
and which backend actually ran (the eager fallback materializes B x C logits just as the plain
formula does; only the fused backends avoid them).

Peak memory, measured per training step (forward, backward, optimizer step; gradients set to None
before it, so they count as allocated by the step) with l2sm_kernels.testing.peak_bytes:
torch.cuda.max_memory_allocated on CUDA; on CPU (whose allocator keeps no peak counter) the step runs
once more under torch.profiler and the peak of the running sum of its allocation and free events is
reported. Frees of memory allocated before profiling are invisible to the profiler; the step is
arranged so that it frees none.
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

import l2sm_kernels as L
from l2sm_kernels.backends import available_backends, resolve
from l2sm_kernels.reference import plain_formula
from l2sm_kernels.testing import peak_bytes

PROVIDERS = ("l2sm", "plain")


@dataclass(frozen=True)
class LargeConfig:
    classes: int = 100_000
    batch: int = 128
    dim: int = 64  # embedding dimension (D)
    in_dim: int = 64  # synthetic input dimension
    steps: int = 100
    warmup: int = 5  # steps excluded from the timing
    lr: float = 0.1
    alpha: float | None = None  # None: the demo's default (alpha_lower_bound(C), at least 16)
    noise: float = 0.5
    # the batches draw from this many identities (a fixed random subset of the classes), so that they
    # recur within the run and the loss visibly falls; every step still scores all `classes` classes
    active: int = 1024
    backend: str = "auto"
    seed: int = 0


def default_large_config(device: torch.device, **overrides) -> LargeConfig:
    """CPU: 100k identities, B = 128, D = 64, 100 steps per provider (a few minutes on 2 shared
    cores with the eager fallback); CUDA: the face-recognition shape, 262k identities, B = 512,
    D = 512, 300 steps."""
    base = LargeConfig() if device.type == "cpu" else LargeConfig(classes=262_144, batch=512, dim=512, steps=300)
    return LargeConfig(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})


def backend_used(backend: str, device: torch.device, dtype=torch.float32) -> tuple[str, str]:
    """(the backend l2_softmax_loss runs for these tensors, why, when 'auto' fell back to eager).
    The library's own one-time fallback warning is absorbed here: the demo prints the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        name = resolve(backend, device.type, {dtype})
    why = ""
    if backend == "auto" and name == "eager":
        preferred = "triton" if device.type == "cuda" else "cpu"
        why = f"fallback: the {preferred} backend is unavailable ({available_backends()[preferred].reason})"
    return name, why


class _Model(nn.Module):
    def __init__(self, cfg: LargeConfig, provider: str, device):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.in_dim, 256), nn.ReLU(), nn.Linear(256, cfg.dim)).to(device)
        self.alpha = cfg.alpha if cfg.alpha is not None else max(L.alpha_lower_bound(cfg.classes), 16.0)
        self.provider = provider
        # L2SoftmaxLoss owns the weight for both providers, so both start from the same init
        self.head = L.L2SoftmaxLoss(cfg.dim, cfg.classes, alpha=self.alpha, backend=cfg.backend, device=device)

    def forward(self, x, y):
        f = self.net(x)
        if self.provider == "l2sm":
            return self.head(f, y)
        return plain_formula(f, self.head.weight, y, self.alpha)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_provider(provider: str, cfg: LargeConfig, device: torch.device, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    model = _Model(cfg, provider, device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    centers = torch.randn(cfg.classes, cfg.in_dim, generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)

    pool = torch.randperm(cfg.classes, generator=gen)[: min(cfg.active, cfg.classes)]

    def batch():
        y = pool[torch.randint(0, len(pool), (cfg.batch,), generator=gen)].to(device)
        x = centers[y] + cfg.noise * torch.randn(cfg.batch, cfg.in_dim, generator=gen).to(device)
        return x, y

    def step(x, y):
        loss = model(x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(range(cfg.steps), desc=f"{provider:5s}", unit="step", leave=False, disable=not progress,
               file=sys.stderr, mininterval=0.5 if tty else 30.0, maxinterval=10.0 if tty else 1e9)
    times, losses = [], []
    for i in bar:
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        loss = step(x, y)
        _sync(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    bar.close()
    losses = torch.stack(losses).float().cpu()
    # one more step, measured for memory only (its gradients start from None, as in every step)
    x, y = batch()
    opt.zero_grad(set_to_none=True)
    peak, method = peak_bytes(lambda: step(x, y), device)
    med = statistics.median(times) if times else float("nan")
    return {
        "provider": provider,
        "step_ms_median": 1e3 * med,
        "step_ms_p20": 1e3 * _quantile(times, 0.2),
        "step_ms_p80": 1e3 * _quantile(times, 0.8),
        "samples_per_s": cfg.batch / med,
        "peak_bytes": int(peak),
        "memory_method": method,
        "losses": losses.tolist(),
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-10:].mean()),
        "timed_steps": len(times),
    }


def _quantile(v, q):
    if not v:
        return float("nan")
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_large(cfg: LargeConfig, device: torch.device, progress: bool = True) -> dict:
    name, why = backend_used(cfg.backend, device)
    res = {"config": asdict(cfg), "device": str(device), "backend": name, "backend_note": why,
           "torch": torch.__version__, "logits_bytes": cfg.batch * cfg.classes * 4}
    for p in PROVIDERS:
        res[p] = train_provider(p, cfg, device, progress)
    # same init, same batches: the two trajectories differ only by floating-point rounding
    res["max_loss_difference"] = max(abs(a - b) for a, b in zip(res["l2sm"]["losses"], res["plain"]["losses"]))
    return res


def _mib(b):
    return f"{b / 2**20:,.1f} MiB"


def format_large(res: dict) -> str:
    c = res["config"]
    alpha = c["alpha"] if c["alpha"] is not None else max(L.alpha_lower_bound(c["classes"]), 16.0)
    lines = [
        f"large-class mode: {c['classes']:,} synthetic identities, B={c['batch']}, D={c['dim']}, alpha={alpha:g}, "
        f"{c['steps']} SGD steps (first {c['warmup']} untimed), fp32, device {res['device']}, torch {res['torch']}",
        f"batches draw from {min(c['active'], c['classes']):,} of the identities, so they recur and the loss falls; "
        f"every step still scores all {c['classes']:,} classes",
        f"l2sm backend used: {res['backend']}" + (f"  ({res['backend_note']})" if res["backend_note"] else ""),
        f"B x C fp32 logits would take {_mib(res['logits_bytes'])}; "
        f"peak memory = {res['l2sm']['memory_method']}, one training step beyond what existed before it "
        f"(gradients included)",
        "",
        f"{'':32s}{'step ms (median, p20-p80)':>28s}{'samples/s':>12s}{'peak memory':>16s}{'loss first -> last':>22s}",
    ]
    labels = {"l2sm": f"l2_softmax_loss ({res['backend']})", "plain": "plain formula (torch)"}
    for p in PROVIDERS:
        r = res[p]
        lines.append(
            f"{labels[p]:32s}{r['step_ms_median']:>10.1f} ({r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f}){'':>6s}"
            f"{r['samples_per_s']:>12,.0f}{_mib(r['peak_bytes']):>16s}"
            f"{r['first_loss']:>11.4f} -> {r['last_loss']:.4f}"
        )
    a, b = res["l2sm"], res["plain"]
    lines.append(
        f"l2sm / plain: time {a['step_ms_median'] / b['step_ms_median']:.2f}x, "
        f"peak memory {a['peak_bytes'] / max(b['peak_bytes'], 1):.2f}x; largest loss difference over the "
        f"{c['steps']} steps {res['max_loss_difference']:.1e} (same init, same batches)"
    )
    if res["backend"] == "eager":
        lines.append("note: the eager backend builds the B x C logits like the plain formula; the fused cpu / "
                     "triton backends are what avoid them.")
    return "\n".join(lines)
