"""Datasets for the training recipe: synthetic face-like classes (nothing to download), an ImageFolder
reader (one folder per class, decoded with Pillow), and a synthetic verification set of held-out classes.
Every dataset yields (uint8 image (3, H, W) RGB, label); the loader applies arcface_torch's training
transform (random horizontal flip, (x / 255 - 0.5) / 0.5)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..verification import VerificationSet, to_model_input

__all__ = ["SyntheticFaces", "ImageFolder", "Indexed", "flip_table", "synthetic_verification_set", "train_transform"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class SyntheticFaces(torch.utils.data.Dataset):
    """num_classes classes of per_class images each, image_size square, deterministic in (seed, index): a
    class is a smooth random colour pattern (a 4 x 4 grid upsampled); an image is it with a random shift of
    up to 2 pixels, a random brightness and pixel noise. Classes [first_class, first_class + num_classes)
    of the same seed are the same whatever num_classes is (held-out classes come after the trained ones)."""

    def __init__(self, num_classes: int, per_class: int = 20, image_size: int = 32, seed: int = 0,
                 first_class: int = 0, noise: float = 20.0):
        self.num_classes, self.per_class, self.size, self.seed = num_classes, per_class, image_size, seed
        self.first_class, self.noise = first_class, noise

    def __len__(self):
        return self.num_classes * self.per_class

    def prototype(self, cls: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + cls)
        grid = torch.rand(1, 3, 4, 4, generator=g)
        return F.interpolate(grid, size=(self.size + 4, self.size + 4), mode="bilinear", align_corners=False)[0]

    def image(self, cls: int, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + cls) * 10_007 + k + 1)
        dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
        x = self.prototype(cls)[:, dy:dy + self.size, dx:dx + self.size]
        x = x * (0.7 + 0.6 * torch.rand((), generator=g)) * 255 + self.noise * torch.randn(x.shape, generator=g)
        return x.round().clamp(0, 255).to(torch.uint8)

    def __getitem__(self, i):
        cls, k = divmod(int(i), self.per_class)
        return self.image(self.first_class + cls, k), cls


class ImageFolder(torch.utils.data.Dataset):
    """root/<class name>/<image files>: labels are the sorted class names' positions; images decoded with
    Pillow to RGB and resized to image_size (square) when they differ."""

    def __init__(self, root: str, image_size: int = 112):
        from ..verification.bin_files import _pil
        self._Image = _pil()
        self.size = image_size
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise ValueError(f"{root}: no class folders")
        self.classes = classes
        self.samples = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                        for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.num_classes = len(classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with self._Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), self._Image.BILINEAR)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return x.permute(2, 0, 1).contiguous(), label


def synthetic_verification_set(pairs: int, image_size: int, seed: int, first_class: int,
                               num_classes: int = 50) -> VerificationSet:
    """A verification set of `pairs` pairs (half genuine, alternating) from SyntheticFaces classes
    [first_class, first_class + num_classes) (held out from training), deterministic in seed."""
    ds = SyntheticFaces(num_classes, per_class=1_000_000, image_size=image_size, seed=seed, first_class=first_class)
    g = torch.Generator().manual_seed(seed + 17)
    imgs, same = [], []
    for i in range(pairs):
        a = int(torch.randint(num_classes, (1,), generator=g))
        b = a if i % 2 == 0 else (a + 1 + int(torch.randint(num_classes - 1, (1,), generator=g))) % num_classes
        ka, kb = torch.randint(1_000_000, (2,), generator=g).tolist()
        imgs += [ds.image(first_class + a, ka), ds.image(first_class + b, kb)]
        same.append(i % 2 == 0)
    return VerificationSet(torch.stack(imgs), torch.tensor(same))


class Indexed(torch.utils.data.Dataset):
    """(image, label, index) of a dataset: the loop draws each image's mirror flip from its index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


def flip_table(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) bool: whether image i is mirrored in this epoch; the same on every rank, so the global batch's
    inputs do not depend on how it is split over the ranks."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)) < 0.5


def train_transform(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """A batch of uint8 images -> model input: the images where `flip` is True mirrored, then
    to_model_input."""
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return to_model_input(images)
