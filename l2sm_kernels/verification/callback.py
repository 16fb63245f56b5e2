"""A training-loop callback that evaluates verification sets every N steps on rank 0 and logs them
(arcface_torch's CallBackVerification, on this package's protocol); docs/verification.md."""
from __future__ import annotations

import logging
import numbers
import os
from typing import Callable, Mapping

import torch

from .bin_files import VerificationSet, read_bin
from .protocols import embed_pairs, evaluate_pairs

__all__ = ["VerificationCallback"]

_log = logging.getLogger("l2sm_kernels.verification")


class VerificationCallback:
    """callback(step, model) evaluates every set when step % every == 0 (and step > 0), on rank 0 only
    (torch.distributed's rank when it is initialized, else 0); other ranks return None at once, so nothing
    here is a collective. `sets` maps a name to a VerificationSet or a .bin path (read once, here).
    Per set it logs XNorm, the flip-test accuracy +- std, the highest accuracy so far and VAL@FAR 1e-3,
    through `log` (default: the "l2sm_kernels.verification" logger's info). Returns {name: results}
    (evaluate_pairs' dict plus "xnorm" and "highest_accuracy"). A DistributedDataParallel wrapper is
    unwrapped (its forward may talk to the other ranks); the bare model in eval mode needs none."""

    def __init__(self, sets: Mapping[str, VerificationSet | str | os.PathLike], every: int = 2000,
                 batch_size: int = 128, nfolds: int = 10, flip: bool = True, bgr: bool = False,
                 image_size=None, log: Callable[[str], None] | None = None, rank: int | None = None):
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every, self.batch_size, self.nfolds, self.flip, self.bgr = int(every), batch_size, nfolds, flip, bgr
        self.log = log or _log.info
        if rank is None:
            rank = torch.distributed.get_rank() if (torch.distributed.is_available()
                                                    and torch.distributed.is_initialized()) else 0
        self.rank = rank
        self.sets: dict[str, VerificationSet] = {}
        if rank == 0:
            for name, s in sets.items():
                self.sets[name] = s if isinstance(s, VerificationSet) else read_bin(s, image_size=image_size)
        self.highest = {name: 0.0 for name in self.sets}

    def evaluate(self, model, step: int) -> dict:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # its forward may broadcast buffers to ranks that are not here: run the wrapped module
            model = model.module
        results = {}
        for name, vs in self.sets.items():
            emb = embed_pairs(model, vs.images, batch_size=self.batch_size, flip=self.flip, bgr=self.bgr)
            r = evaluate_pairs(emb.embeddings, vs.issame, nfolds=self.nfolds, normalize=False)
            r["xnorm"] = emb.xnorm
            self.highest[name] = max(self.highest[name], r["accuracy"])
            r["highest_accuracy"] = self.highest[name]
            self.log(f"[{name}][{step}] XNorm: {emb.xnorm:f}  Accuracy-Flip: {r['accuracy']:.5f}+-"
                     f"{r['accuracy_std']:.5f}  Highest Accuracy-Flip: {self.highest[name]:.5f}  "
                     f"VAL@FAR=1e-3: {r['val']:.5f}+-{r['val_std']:.5f} (FAR {r['far']:.5f})")
            results[name] = r
        return results

    def __call__(self, step: int, model) -> dict | None:
        if self.rank != 0 or step <= 0 or step % self.every:
            return None
        return self.evaluate(model, step)
