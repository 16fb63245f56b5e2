"""InsightFace's verification `.bin` files (LFW, CFP-FP, AgeDB-30, ...): read_bin, write_bin, and the
model-input transform (docs/verification.md).

A `.bin` is a pickle of (bins, issame_list): bins holds 2N encoded images (JPEG or PNG bytes), pair i is
(bins[2i], bins[2i + 1]); issame_list holds N booleans. Files written by Python 2 hold `str` images and
load with encoding="bytes" (arcface_torch retries that way too). A pickle can run any callable it
names, so these files are read through a restricted unpickler that resolves only the few globals such a
file holds (bytes written by Python 3 under protocol <= 2 come as `_codecs.encode`; numpy booleans and
arrays as numpy's scalar / array reconstructors); anything else is refused before it is called.

Images are decoded with Pillow (an optional dependency: `pip install l2sm_kernels[verification]` or
`pip install pillow`). Pillow's JPEG decoder (libjpeg-turbo) and the OpenCV / MXNet one that
arcface_torch uses may differ by one grey level on some pixels, so embeddings of the same file can differ
in the last bits between the two pipelines.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["VerificationSet", "read_bin", "write_bin", "to_model_input"]

# the only globals a .bin pickle may name (module, name); see the module docstring
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),  # Python 3 bytes under pickle protocol <= 2
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),  # Python 2 names (pickle maps most of them to builtins itself)
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),  # a numpy bool_ in issame_list
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),  # a numpy array (issame_list as an array)
    ("numpy._core.multiarray", "_reconstruct"),
}


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load the global {module}.{name}: a verification .bin holds only bytes, lists, tuples "
            "and booleans, and unpickling anything else could run code")


def _load_pickle(path: str):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _BinUnpickler(io.BytesIO(data)).load()
    except UnicodeDecodeError:  # a Python 2 pickle of str images: keep them as bytes
        return _BinUnpickler(io.BytesIO(data), encoding="bytes").load()


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading verification .bin files needs Pillow: pip install pillow "
                          "(or pip install l2sm_kernels[verification])") from e
    return Image


class VerificationSet(NamedTuple):
    images: torch.Tensor  # (2N, 3, H, W) uint8, RGB; pair i is rows 2i, 2i + 1
    issame: torch.Tensor  # (N,) bool


def read_bin(path: str | os.PathLike, image_size: Sequence[int] | None = None) -> VerificationSet:
    """Read an InsightFace verification .bin: (images (2N, 3, H, W) uint8 RGB, issame (N,) bool).

    image_size (H, W): resize images of another size to it (Pillow, bilinear); None: every image must have
    the size of the first one. Errors name the file: not a (bins, issame) pickle, a global outside the
    allow-list (a malicious or foreign pickle: pickle.UnpicklingError), 2N images for N flags, an image that
    does not decode, sizes that disagree.
    """
    path = os.fspath(path)
    Image = _pil()
    try:
        obj = _load_pickle(path)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from e
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a verification .bin (a pickle of (bins, issame_list)): "
                         f"{type(e).__name__}: {e}") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickle of (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    issame = np.asarray(issame)
    if issame.ndim != 1 or not (issame.dtype == np.bool_ or np.isin(issame, (0, 1)).all()):
        raise ValueError(f"{path}: issame_list must be a flat list of booleans, got dtype {issame.dtype}, "
                         f"shape {issame.shape}")
    n = len(issame)
    if len(bins) != 2 * n:
        raise ValueError(f"{path}: {len(bins)} images for {n} pairs (need 2 per pair)")
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
    out = None
    for i, b in enumerate(bins):
        if isinstance(b, np.ndarray):  # some converters store the encoded bytes as a uint8 array
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is a {type(b).__name__}, not encoded image bytes")
        try:
            with Image.open(io.BytesIO(b)) as im:
                im = im.convert("RGB")
                if image_size is not None and im.size != (image_size[1], image_size[0]):
                    im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise ValueError(f"{path}: image {i} does not decode: {type(e).__name__}: {e}") from e
        if out is None:
            out = torch.empty((2 * n, 3, a.shape[0], a.shape[1]), dtype=torch.uint8)
        elif a.shape[:2] != tuple(out.shape[2:]):
            raise ValueError(f"{path}: image {i} is {a.shape[0]}x{a.shape[1]}, image 0 is "
                             f"{out.shape[2]}x{out.shape[3]} (pass image_size to resize)")
        out[i] = torch.from_numpy(a.transpose(2, 0, 1).copy())
    if out is None:
        raise ValueError(f"{path}: the set holds no pairs")
    return VerificationSet(out, torch.from_numpy(issame.astype(bool)))


def write_bin(path: str | os.PathLike, images: torch.Tensor, issame, format: str = "JPEG", quality: int = 95) -> None:
    """Write images (2N, 3, H, W) uint8 RGB and issame (N,) as an InsightFace .bin (a pickle of (list of
    encoded bytes, list of bool)); format "JPEG" (what their files hold) or "PNG" (lossless)."""
    Image = _pil()
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] == 3):
        raise ValueError("images must be a uint8 tensor (2N, 3, H, W)")
    flags = [bool(v) for v in (issame.tolist() if isinstance(issame, torch.Tensor) else issame)]
    if images.shape[0] != 2 * len(flags):
        raise ValueError(f"images has {images.shape[0]} rows for {len(flags)} pairs (need 2 per pair)")
    bins = []
    for img in images:
        buf = io.BytesIO()
        kw = {"quality": quality} if format.upper() == "JPEG" else {}
        Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buf, format=format, **kw)
        bins.append(buf.getvalue())
    with open(os.fspath(path), "wb") as f:
        pickle.dump((bins, flags), f, protocol=pickle.HIGHEST_PROTOCOL)


def to_model_input(images: torch.Tensor, bgr: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """arcface_torch's input transform: uint8 (B, 3, H, W) RGB -> (x / 255 - 0.5) / 0.5 in `dtype`, in
    [-1, 1]. bgr=True swaps the channels to BGR first (models trained the AdaFace way expect BGR)."""
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    x = images.flip(1) if bgr else images
    # the same operations in the same order as arcface_torch (x / 255, - 0.5, / 0.5): identical float32 values
    return ((x.to(dtype) / 255) - 0.5) / 0.5
