"""Mutation audit: does the test suite catch small numeric bugs?

Each mutation in tests/mutations.py is a one-line change (a `find` string, which must occur exactly
once in its file, and its `replace`), with the test subset that should catch it. For each one this
script copies the repository's tracked files into a scratch folder (once), applies the mutation there,
rebuilds the C++ extension when a csrc/ file changed, runs the subset, and records whether the tests
failed (caught), passed (survived), or could not run (error: the subset timed out or pytest could not
collect it, which does not count as caught). The scratch copy is restored after every mutation. Nothing
in the working tree is touched.

    python tests/mutation_audit.py                 # every mutation (slow: about an hour on 2 cores)
    python tests/mutation_audit.py -k margin -k cpu  # those whose id contains any of the words
    python tests/mutation_audit.py --list
    python tests/mutation_audit.py --json results/mutations.json

Not part of CI (it is slow). Run it when resolving an issue that touches a kernel or the op contract
and report the survival rate (docs/contributing.md, "the mutation audit").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS  # noqa: E402


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f]


def _copy_tree(dst: Path) -> None:
    for rel in _tracked_files():
        src = ROOT / rel
        if src.is_file():
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    for so in (ROOT / "l2sm_kernels").glob("_C*.so"):  # the built extension (rebuilt when csrc/ mutates)
        shutil.copy2(so, dst / "l2sm_kernels" / so.name)


def _build(tree: Path, log) -> bool:
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, capture_output=True,
                       text=True, env=dict(os.environ, L2SM_REQUIRE_EXT="1"))
    log.write(r.stdout[-4000:] + r.stderr[-4000:])
    return r.returncode == 0


def run_one(tree: Path, m: dict, timeout: float, log) -> tuple[str, float, str]:
    path = tree / m["file"]
    original = path.read_text()
    n = original.count(m["find"])
    if n != 1:
        return "error", 0.0, f"find string occurs {n} times in {m['file']}"
    t0 = time.time()
    path.write_text(original.replace(m["find"], m["replace"]))
    try:
        if m["file"].startswith("csrc/") and not _build(tree, log):
            return "caught", time.time() - t0, "the mutated C++ does not build"
        env = dict(os.environ, **m.get("env", {}), PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m["tests"]]
        try:
            r = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "error", time.time() - t0, f"timed out after {timeout:.0f} s"
        tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        log.write(f"\n== {m['id']}: exit {r.returncode}: {tail}\n")
        if r.returncode == 1:
            return "caught", time.time() - t0, tail
        if r.returncode == 0:
            return "survived", time.time() - t0, tail
        return "error", time.time() - t0, f"pytest exit {r.returncode}: {tail}"
    finally:
        path.write_text(original)
        if m["file"].startswith("csrc/"):
            _build(tree, log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", action="append", default=[], help="run mutations whose id contains this word (repeatable)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's test subset")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not a.k or any(k in m["id"] for k in a.k)]
    if a.list:
        for m in chosen:
            print(f"{m['id']:40s} {m['file']:45s} {m['why']}")
        print(f"{len(chosen)} mutations")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="l2sm-mutation-"))
    tree = tmp / "repo"
    _copy_tree(tree)
    log_path = tmp / "audit.log"
    rows = []
    with open(log_path, "w") as log:
        print(f"{len(chosen)} mutations; scratch copy {tree}; log {log_path}", flush=True)
        for i, m in enumerate(chosen, 1):
            status, secs, detail = run_one(tree, m, a.timeout, log)
            rows.append({"id": m["id"], "file": m["file"], "why": m["why"], "status": status,
                         "seconds": round(secs, 1), "detail": detail})
            print(f"[{i:2d}/{len(chosen)}] {status:8s} {secs:6.1f} s  {m['id']:40s} {detail[:70]}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("caught", "survived", "error")}
    ran = counts["caught"] + counts["survived"]
    rate = counts["survived"] / ran if ran else float("nan")
    print(f"\ncaught {counts['caught']}, survived {counts['survived']}, error {counts['error']} "
          f"of {len(rows)}: survival rate {100 * rate:.1f} % of the {ran} that ran")
    for r in rows:
        if r["status"] != "caught":
            print(f"  {r['status']}: {r['id']} ({r['file']}): {r['why']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"counts": counts, "survival_rate": rate, "rows": rows}, indent=1))
    if a.keep:
        print(f"scratch copy kept: {tree}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
