"""Reshard arcface_torch head checkpoints from N per-rank files to M:

    python -m l2sm_kernels.compat.reshard SRC_DIR DST_DIR --world-size M [--form F] [--out-form F]
                                          [--num-classes C]

SRC_DIR holds one of their three forms (rank:{r}_softmax_weight.pt, softmax_fc_gpu_{r}.pt,
checkpoint_gpu_{r}.pt; l2sm_kernels.compat.checkpoints); DST_DIR gets M files of the same form (or
--out-form) in their layout. Files are read with torch.load(weights_only=True); an error names the file.
"""
from __future__ import annotations

import argparse
import sys

from .checkpoints import FORMS, CheckpointError, find_checkpoint, reshard


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m l2sm_kernels.compat.reshard",
                                description="Reshard arcface_torch per-rank head checkpoints from N files to M.")
    p.add_argument("src", help="directory with the per-rank files")
    p.add_argument("dst", help="directory to write the new per-rank files to")
    p.add_argument("--world-size", type=int, required=True, help="the new number of ranks M")
    p.add_argument("--form", choices=sorted(FORMS), default=None, help="the form to read (default: the one present)")
    p.add_argument("--out-form", choices=sorted(FORMS), default=None, help="the form to write (default: --form's)")
    p.add_argument("--num-classes", type=int, default=None, help="check the total number of classes")
    a = p.parse_args(argv)
    try:
        ck = find_checkpoint(a.src, a.form, a.num_classes)
        paths = reshard(a.src, a.dst, a.world_size, ck.form, a.out_form, a.num_classes)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{ck.num_classes} classes x {ck.embedding_size} ({ck.form}, {ck.world_size} files) -> "
          f"{len(paths)} files in {a.dst}: {', '.join(p.rsplit('/', 1)[-1] for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
