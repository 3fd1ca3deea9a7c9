"""Network families: the seed's Wide-ResNet, CIFAR ResNets (6n+2) and ImageNet-style ResNets
(18/34/50) with adaptive pooling so that 8x8 inputs work."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from .blocks import BasicBlock, Bottleneck, WideBasic
from .fusion import FusionSpec, PinnedBatchNorm2d, parse_fusion

__all__ = ["WideResNet", "CifarResNet", "ResNet4", "TinyMLP"]

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "leaky-relu": lambda: nn.LeakyReLU(0.01), "celu": nn.CELU,
         "elu": nn.ELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _reset_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()  # PinnedBatchNorm2d re-applies its init:v values


class WideResNet(nn.Module):
    """WRN-depth-widen faithful to the seed (depth = 6n+4): stem conv3x3(in, 16) with bias;
    stages 16k / 32k / 64k with n pre-activation blocks each (stride on conv2); final BN with
    momentum 0.9 - ReLU - global average pool - Linear. Convs xavier_uniform(gain sqrt 2), bias 0;
    BN weight 1, bias 0 (``init:v`` fusion BNs start at v)."""

    def __init__(self, depth: int = 16, widen: int = 10, dropout: float = 0.3, num_classes: int = 10,
                 in_chans: int = 3, fusion: "FusionSpec | str" = "add,r=bn,s=id",
                 attention: str | None = None, attention_kwargs: dict | None = None,
                 final_bn_momentum: float = 0.9):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        spec = parse_fusion(fusion)
        stages = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, stages[0], 3, padding=1, bias=True)
        in_planes, layers = stages[0], []
        for i, (planes, stride) in enumerate(zip(stages[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(in_planes, planes, stride if j == 0 else 1, dropout, spec,
                                        attention, attention_kwargs))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn1 = nn.BatchNorm2d(stages[3], momentum=final_bn_momentum)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(stages[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2.0))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        _reset_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))  # (N, 64k, H/4, W/4)
        out = self.pool(F.relu(self.bn1(out))).flatten(1)           # (N, 64k)
        return self.linear(out)                                     # (N, classes)


def _kaiming(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    _reset_bn(model)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, CIFAR variant): stem conv3x3-BN-ReLU, three
    stages of n basic blocks with widths w / 2w / 4w, global average pool, Linear."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_chans: int = 3,
                 fusion: "FusionSpec | str" = "add,r=bn,s=id", attention: str | None = None,
                 attention_kwargs: dict | None = None, post_act: str = "relu"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        spec = parse_fusion(fusion)
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes, layers = width, []
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1, spec, attention,
                                         attention_kwargs, post_act))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))                # (N, w, H, W)
        out = self.layer3(self.layer2(self.layer1(out)))     # (N, 4w, H/4, W/4)
        return self.fc(self.pool(out).flatten(1))            # (N, classes)


_RESNET4_BLOCKS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                   50: (Bottleneck, (3, 4, 6, 3))}


class ResNet4(nn.Module):
    """Four-stage ResNet-18/34/50 (widths w, 2w, 4w, 8w) with adaptive average pooling, so any
    input of at least 8x8 works. ``stem='imagenet'`` is conv7x7/2 + maxpool/2 (the course project's
    architecture, with a configurable activation after the stem conv); ``stem='cifar'`` is a
    conv3x3/1 stem without pooling (better for 8x8 to 32x32 inputs)."""

    def __init__(self, depth: int = 18, width: int = 64, num_classes: int = 10, in_chans: int = 3,
                 fusion: "FusionSpec | str" = "add,r=bn,s=id", attention: str | None = None,
                 attention_kwargs: dict | None = None, stem: str = "cifar", stem_act: str = "relu",
                 post_act: str = "relu"):
        super().__init__()
        if depth not in _RESNET4_BLOCKS:
            raise ValueError(f"resnet4 depth must be 18, 34 or 50, got {depth}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if stem_act not in _ACTS:
            raise ValueError(f"stem_act {stem_act!r}: expected one of {', '.join(_ACTS)}")
        block, counts = _RESNET4_BLOCKS[depth]
        spec = parse_fusion(fusion)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.act = _ACTS[stem_act]()
        in_planes, layers = width, []
        for i, count in enumerate(counts):
            planes, blocks = width * 2 ** i, []
            for j in range(count):
                blocks.append(block(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1, spec,
                                    attention, attention_kwargs, post_act))
                in_planes = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.act(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (N, 8w*exp, h, w)
        return self.fc(self.pool(out).flatten(1))                       # (N, classes)


class TinyMLP(nn.Module):
    """A two-hidden-layer MLP on flattened images (a non-convolutional reference model)."""

    def __init__(self, in_chans: int = 1, image_size: int = 8, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * image_size * image_size, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
