"""Findable gates.

Every sigmoid-like squashing that *multiplies* a feature map (a "gate") is an instance of
:class:`Gate`, a tiny module whose ``forward`` receives the gate's *input logits*.  Probes find
gates with :func:`find_gates` and attach a forward hook to read those logits (``inputs[0]``) and
the gate outputs, without knowing anything about the architecture around them.

Kinds and their saturation-relevant derivative at 0:

* ``sigmoid``      sigma(z) = 1 / (1 + e^-z),          sigma'(0) = 1/4
* ``tanh``         tanh(z),                             tanh'(0)  = 1
* ``hard_sigmoid`` relu6(z + 3) / 6 (as in h_swish),    slope 1/6 inside (-3, 3), 0 outside
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

GATE_KINDS = ("sigmoid", "tanh", "hard_sigmoid")


class Gate(nn.Module):
    """A named squashing nonlinearity whose input is the gate logit.

    ``role`` is a short free-text label set by the owner (e.g. ``"fusion.r"``, ``"se.channel"``,
    ``"cbam.spatial"``) so that probe tables say what each gate does.
    """

    def __init__(self, kind: str = "sigmoid", role: str = ""):
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {kind!r}; expected one of {', '.join(GATE_KINDS)}")
        self.kind = kind
        self.role = role

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "sigmoid":
            return torch.sigmoid(z)
        if self.kind == "tanh":
            return torch.tanh(z)
        return F.relu6(z + 3.0) / 6.0

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, role={self.role!r}"


class HSwish(nn.Module):
    """h_swish(z) = z * hard_sigmoid(z); the hard sigmoid is a findable :class:`Gate`."""

    def __init__(self, role: str = "h_swish"):
        super().__init__()
        self.gate = Gate("hard_sigmoid", role=role)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.gate(z)


@dataclass(frozen=True)
class GateInfo:
    """Where a gate sits: its dotted module path, kind and role."""

    path: str
    kind: str
    role: str


def find_gates(model: nn.Module) -> list[GateInfo]:
    """All :class:`Gate` modules of ``model`` in registration (forward-ish) order."""
    return [
        GateInfo(path=name, kind=m.kind, role=m.role)
        for name, m in model.named_modules()
        if isinstance(m, Gate)
    ]
