"""The sweep's output formats: the tidy rows (benchmarks/harness.py, COLUMNS) written as CSV and JSON,
the text table (one per device / dtype / op / shape group, ratios within the group) and the plot of time
and memory against C."""
from __future__ import annotations

import csv
import json
import math

from benchmarks.harness import COLUMNS, FLOOR, MiB

def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})


def write_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump([{k: r.get(k) for k in COLUMNS} for r in rows], f, indent=1)


def _fmt(v, spec: str, none: str = "") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (op, B, D, dtype, options, device), in order of appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["B"], r["D"], r["dtype"], r["options"], r["device"]), []).append(r)
    return groups


def format_table(rows: list[dict]) -> str:
    """Markdown tables, one per (op, B, D, dtype, options, device), C then provider down the rows.
    Memory in MiB beyond the inputs: the allocator peak, the same less the gradients, and (CPU) the
    RSS high-water mark."""
    out = []
    for (op, B, D, dtype, options, device), grp in table_groups(rows).items():
        title = f"{op}, B={B}, D={D}, {dtype}"
        if options != "default":
            title += f", {options}"
        out.append(f"**{title}, {device}: {grp[0]['device_name']}, torch {grp[0]['torch']}, "
                   f"{grp[0]['threads']} threads**\n")
        rss = any(r["peak_rss_bytes"] is not None for r in grp)
        cols = ["C", "provider", "median ms (p20-p80)", "TFLOP/s", "x eager", "x floor", "peak MiB",
                "beyond grads MiB"] + (["RSS peak MiB"] if rss else [])
        out.append("| " + " | ".join(cols) + " |")
        out.append("|---:|---|" + "---:|" * (len(cols) - 2))
        for r in sorted(grp, key=lambda r: r["C"]):
            if r["status"] != "ok":
                out.append(f"| {r['C']} | {r['provider']} | {r['status']} |" + " |" * (len(cols) - 3))
                continue
            cells = [
                str(r["C"]), r["provider"], f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})",
                _fmt(r["tflops"], ".3f"), _fmt(r["ratio_eager"], ".2f"), _fmt(r["ratio_floor"], ".2f"),
                _fmt(r["peak_mem_bytes"] / MiB, ".1f"), _fmt(r["peak_beyond_grads_bytes"] / MiB, ".1f"),
            ]
            if rss:
                cells.append(_fmt(r["peak_rss_bytes"] and r["peak_rss_bytes"] / MiB, ".1f"))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    """PNG: per (op, B, D, dtype, options, device) a row of three log-log panels: median time and peak
    memory beyond the inputs against C, one line per provider (the gradients' size dotted), and time
    against memory, one point per (provider, C), the points of one C joined in order of memory (the
    memory dial's trade-off next to the baselines')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = table_groups(rows)
    fig, axes = plt.subplots(len(groups), 3, figsize=(18, 4.2 * len(groups)), squeeze=False)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    for (key, grp), (ax_t, ax_m, ax_tm) in zip(groups.items(), axes):
        op, B, D, dtype, options, device = key
        for p in providers:
            ok = sorted((r for r in grp if r["provider"] == p and r["status"] == "ok"), key=lambda r: r["C"])
            if not ok:
                continue
            cs = [r["C"] for r in ok]
            style = dict(color=colors[p], marker="o", label=p, linestyle="--" if p == FLOOR else "-")
            ax_t.plot(cs, [r["median_ms"] for r in ok], **style)
            ax_t.fill_between(cs, [r["p20_ms"] for r in ok], [r["p80_ms"] for r in ok], color=colors[p], alpha=0.15)
            ax_m.plot(cs, [max(r["peak_mem_bytes"], 1) / MiB for r in ok], **style)
            rss = [(r["C"], r["peak_rss_bytes"]) for r in ok if r["peak_rss_bytes"]]
            if rss:
                ax_m.plot([c for c, _ in rss], [b / MiB for _, b in rss], color=colors[p], linestyle=":",
                          marker=".", alpha=0.6, label=f"{p} (RSS)")
        markers = "os^Dv<>p*h"
        cs_all = sorted({r["C"] for r in grp})
        for k, c in enumerate(cs_all):
            ok = sorted((r for r in grp if r["C"] == c and r["status"] == "ok"), key=lambda r: r["peak_mem_bytes"])
            if not ok:
                continue
            mem = [max(r["peak_mem_bytes"], 1) / MiB for r in ok]
            ax_tm.plot(mem, [r["median_ms"] for r in ok], color="gray", alpha=0.4, linewidth=0.8)
            for r, m in zip(ok, mem):
                ax_tm.scatter([m], [r["median_ms"]], color=colors[r["provider"]], marker=markers[k % len(markers)],
                              label=r["provider"] if k == 0 else None, zorder=3)
            ax_tm.annotate(f"C={c}", (mem[-1], ok[-1]["median_ms"]), fontsize=7, alpha=0.7)
        grads = sorted({(r["C"], r["grad_bytes"]) for r in grp if r["grad_bytes"]})
        if grads:
            ax_m.plot([c for c, _ in grads], [g / MiB for _, g in grads], color="black", linestyle=":",
                      label="gradients (x, W)")
        where = f"{op}, B={B}, D={D}, {dtype}" + (f", {options}" if options != "default" else "")
        dev = grp[0]["device_name"]
        ax_t.set_title(f"time\n{where}, {dev}", fontsize=10)
        ax_t.set(xlabel="classes C", ylabel="median ms (band: p20-p80)")
        ax_m.set_title(f"peak memory beyond the inputs\n{where}, {dev}", fontsize=10)
        ax_m.set(xlabel="classes C",
                 ylabel="MiB (allocator peak; dotted: RSS high-water)" if device == "cpu" else "MiB (allocator peak)")
        ax_tm.set_title(f"time against memory (markers: C)\n{where}, {dev}", fontsize=10)
        ax_tm.set(xlabel="peak MiB beyond the inputs (allocator)", ylabel="median ms")
        for ax in (ax_t, ax_m, ax_tm):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
