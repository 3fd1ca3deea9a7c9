"""Residual blocks whose fusion, in-branch gate and attention are constructor arguments."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .fusion import LEARN, Fusion, FusionSpec, FusionSpecError, GateSpec, PinnedBatchNorm2d, parse_fusion
from .gates import Gate

__all__ = ["LastConv", "WideBasic", "BasicBlock", "Bottleneck"]


def _attention(name, channels, kwargs):
    from .attention import create_attention
    return create_attention(name, channels, **(kwargs or {}))


class LastConv(nn.Module):
    """The residual branch's last conv, from ``h`` = output of the BN that precedes it.

    Without a gate: ``conv(relu(h))``. With a :class:`GateSpec`:
    ``act_out(conv(conv_in(h))) * act(adapter(src(h)))`` (the seed's
    ``out *= self.adap(out_1).sigmoid()``).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, gate: GateSpec | None,
                 kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.gate_spec = gate
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
        if gate is None:
            return
        if gate.adapter == "pool":
            if c_in != c_out:
                raise FusionSpecError(f"gate adapter 'pool' needs equal channels in and out ({c_in} != {c_out}); use conv1x1")
            self.adapter = nn.AdaptiveAvgPool2d(1)
        else:
            k = 1 if gate.adapter == "conv1x1" else 3
            self.adapter = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=bias)
        self.adapter_gate = Gate("sigmoid", role="resgate.adapter") if gate.act == "sigmoid" else nn.Identity()
        self.conv_in_gate = Gate("sigmoid", role="resgate.conv_in") if gate.conv_input == "sig" else None
        self.out_gate = Gate("sigmoid", role="resgate.out") if gate.out_act == "sigmoid" else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = self.gate_spec
        if g is None:
            return self.conv(F.relu(h))
        a = F.relu(h)
        if g.conv_input == "relu":
            cin = a
        elif g.conv_input == "id":
            cin = h
        else:
            cin = self.conv_in_gate(h)
        out = self.out_gate(self.conv(cin))                                   # (N, C_out, H', W')
        mask = self.adapter_gate(self.adapter(a if g.source == "relu" else h))  # (N, C_out, H'|1, W'|1)
        return out * mask


def _mid_bn(channels: int, gate: GateSpec | None) -> PinnedBatchNorm2d:
    return PinnedBatchNorm2d(channels, bias=gate.bn2_bias if gate is not None else LEARN)


class WideBasic(nn.Module):
    """The seed's pre-activation ``wide_basic``: bn1-relu-conv1-dropout-bn2-relu-conv2(stride),
    conv biases, shortcut identity or strided 1x1 conv (bias), no ReLU after the fusion."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0,
                 fusion: "FusionSpec | str" = "add,r=bn,s=id", attention: str | None = None,
                 attention_kwargs: dict | None = None):
        super().__init__()
        spec = parse_fusion(fusion)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = _mid_bn(planes, spec.gate)
        self.conv2 = LastConv(planes, planes, stride, spec.gate, kernel_size=3, bias=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True)
        self.attn = _attention(attention, planes, attention_kwargs)
        self.fusion = Fusion(spec, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))  # (N, planes, H, W)
        r = self.attn(self.conv2(self.bn2(out)))             # (N, planes, H/stride, W/stride)
        return self.fusion(r, self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


def _post_act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name in ("none", "identity"):
        return nn.Identity()
    raise ValueError(f"post_act {name!r}: expected relu or none")


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al.): conv3x3(stride)-bn1-relu-conv3x3 -> r;
    ``post_act(fusion(r, shortcut(x)))``. With ``add,r=bn,s=id`` this is the classic block."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 fusion: "FusionSpec | str" = "add,r=bn,s=id", attention: str | None = None,
                 attention_kwargs: dict | None = None, post_act: str = "relu"):
        super().__init__()
        spec = parse_fusion(fusion)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _mid_bn(planes, spec.gate)
        self.conv2 = LastConv(planes, planes, 1, spec.gate, kernel_size=3, bias=False)
        self.shortcut = _projection(in_planes, planes, stride)
        self.attn = _attention(attention, planes, attention_kwargs)
        self.fusion = Fusion(spec, planes)
        self.post = _post_act(post_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.attn(self.conv2(self.bn1(self.conv1(x))))  # (N, planes, H/stride, W/stride)
        return self.post(self.fusion(r, self.shortcut(x)))


class Bottleneck(nn.Module):
    """Bottleneck (1x1-3x3(stride)-1x1, expansion 4); attention and fusion act on the
    ``planes * 4`` output channels."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 fusion: "FusionSpec | str" = "add,r=bn,s=id", attention: str | None = None,
                 attention_kwargs: dict | None = None, post_act: str = "relu"):
        super().__init__()
        spec = parse_fusion(fusion)
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _mid_bn(planes, spec.gate)
        self.conv3 = LastConv(planes, out_planes, 1, spec.gate, kernel_size=1, bias=False)
        self.shortcut = _projection(in_planes, out_planes, stride)
        self.attn = _attention(attention, out_planes, attention_kwargs)
        self.fusion = Fusion(spec, out_planes)
        self.post = _post_act(post_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.bn1(self.conv1(x))))  # (N, planes, H/stride, W/stride)
        r = self.attn(self.conv3(self.bn2(h)))           # (N, 4*planes, H/stride, W/stride)
        return self.post(self.fusion(r, self.shortcut(x)))
