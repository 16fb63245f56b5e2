"""Backbones for the training recipe: a small iresnet-style network (arcface_torch's IResNet blocks:
BN - conv3x3 - BN - PReLU - conv3x3 (stride) - BN, plus a projected shortcut; a BN - dropout - flatten -
linear - BN1d embedding head), and a loader for any torchvision-style model."""
from __future__ import annotations

import importlib

import torch
from torch import nn

__all__ = ["IBasicBlock", "IResNet", "build_backbone", "BACKBONES"]


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """iresnet-style: a conv3x3 stem, len(layers) stages of IBasicBlocks (the first of each with stride 2),
    then BN2d, dropout, flatten, a linear layer to num_features and a BatchNorm1d with a fixed unit scale
    (as arcface_torch). image_size must be divisible by 2 ** len(layers) (112 -> 7 x 7 with 4 stages)."""

    def __init__(self, layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), num_features: int = 128,
                 image_size: int = 32, dropout: float = 0.0):
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers and widths must have the same length, got {layers} and {widths}")
        if image_size % (2 ** len(layers)):
            raise ValueError(f"image_size must be divisible by {2 ** len(layers)}, got {image_size}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        stages, cin = [], widths[0]
        for n, w in zip(layers, widths):
            blocks = [IBasicBlock(cin, w, 2)] + [IBasicBlock(w, w, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        side = image_size // 2 ** len(layers)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x):
        x = self.stages(self.prelu(self.bn1(self.conv1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        # the embedding layer runs in float32 under autocast, as arcface_torch's backbones do
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


BACKBONES = {
    "iresnet-tiny": dict(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128)),
    "iresnet-small": dict(layers=(2, 2, 2, 2), widths=(32, 64, 128, 256)),
    "iresnet18": dict(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
}


def mlp(num_features: int, image_size: int, hidden: int = 256) -> nn.Module:
    """A batch-norm-free backbone (flatten, linear, PReLU, linear): its output does not depend on how a
    batch is split over ranks, which is what tests of the distributed loop compare."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden), nn.PReLU(hidden),
                         nn.Linear(hidden, num_features))


def build_backbone(name: str, num_features: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    """One of BACKBONES, "mlp" (no batch norm), "torchvision:<model name>" (a torchvision classification
    model whose last linear layer `fc` / `classifier[-1]` / `head` is replaced by one of num_features
    outputs), or "package.module:callable" (called with num_features=...; must return a module mapping
    (B, 3, H, W) to (B, num_features))."""
    if name == "mlp":
        return mlp(num_features, image_size)
    if name in BACKBONES:
        return IResNet(num_features=num_features, image_size=image_size, dropout=dropout, **BACKBONES[name])
    if name.startswith("torchvision:"):
        try:
            import torchvision
        except ImportError as e:
            raise ImportError(f"backbone {name!r} needs torchvision (pip install torchvision)") from e
        model = torchvision.models.get_model(name.split(":", 1)[1], weights=None)
        for attr in ("fc", "head", "classifier"):
            layer = getattr(model, attr, None)
            if isinstance(layer, nn.Linear):
                setattr(model, attr, nn.Linear(layer.in_features, num_features))
                return model
            if isinstance(layer, nn.Sequential) and isinstance(layer[-1], nn.Linear):
                layer[-1] = nn.Linear(layer[-1].in_features, num_features)
                return model
        raise ValueError(f"backbone {name!r}: no final nn.Linear (fc, head or classifier) to replace")
    if ":" in name:
        mod, fn = name.split(":", 1)
        return getattr(importlib.import_module(mod), fn)(num_features=num_features)
    raise ValueError(f"unknown backbone {name!r}: one of {sorted(BACKBONES) + ['mlp']}, 'torchvision:<name>' or "
                     "'package.module:callable'")
