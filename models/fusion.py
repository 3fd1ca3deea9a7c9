"""Residual fusion as data.

A block computes a residual branch ``r`` (the conv2 output) and a shortcut ``s`` and fuses them
with ``op`` (``add`` or ``mul``) after an optional per-operand transformation:

    branch(t) = act(norm(t)) + offset,      fused = branch_r(r) OP branch_s(s)

* ``norm``: ``none`` | ``bn`` (a :class:`PinnedBatchNorm2d`) | ``nam`` (NAM attention, x*sigma(w*BN(x)))
* BN weight / bias each ``learn`` (default init 1 / 0) | ``init:v`` (learnable, starts at v) |
  ``fixed:v`` (not a parameter: the value v is re-imposed on every forward, so optimizer steps and
  weight decay can never move it -- the seed code's ``self.bn_s.bias.data[:] = 1`` inside ``forward``)
* ``act``: ``identity`` | ``sigmoid`` (a findable :class:`models.gates.Gate`)
* ``offset``: 0 | 0.5 | 1 (any float is accepted)

Optionally a gate *inside* the residual branch (:class:`GateSpec`, the seed's
``out *= adapter(h).sigmoid()``).

Canonical names (shell-safe, parse back to the same spec)::

    spec   := OP ",r=" BRANCH ",s=" BRANCH [",gate=" GATE]
    BRANCH := "id" | STEP ("/" STEP)*        STEP order: norm, act, offset
    STEP   := "bn" ["@w=" MODE] ["@b=" MODE] | "nam" | "sig" | "+" NUMBER
    MODE   := "learn" | "init:" NUMBER | "fixed:" NUMBER
    GATE   := ("conv1x1" | "conv3x3" | "pool") ["@src=bn"] ["@conv=id"|"@conv=sig"]
              ["@bn2b=" MODE] ["@act=id"] ["@out=sig"]

e.g. ``add,r=bn,s=id`` (ResNet) or ``mul,r=bn@b=fixed:0/sig,s=bn@b=fixed:1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn
import torch.nn.functional as F

from .gates import Gate

__all__ = [
    "ParamMode", "BranchSpec", "GateSpec", "FusionSpec", "parse_fusion", "FusionSpecError",
    "PinnedBatchNorm2d", "Branch", "Fusion", "ADD", "MUL_MEAN1",
]


class FusionSpecError(ValueError):
    """A fusion spec string or field that cannot be understood."""


def _num(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise FusionSpecError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise FusionSpecError(f"{what}: {text!r} is not finite")
    return v


def _fmt(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class ParamMode:
    """How a BN affine parameter behaves: ``learn`` | ``init:v`` | ``fixed:v``."""

    mode: str = "learn"
    value: float | None = None

    def __post_init__(self):
        if self.mode not in ("learn", "init", "fixed"):
            raise FusionSpecError(f"parameter mode {self.mode!r}: expected learn, init:v or fixed:v")
        if self.mode == "learn" and self.value is not None:
            raise FusionSpecError("mode 'learn' takes no value (use init:v)")
        if self.mode != "learn" and self.value is None:
            raise FusionSpecError(f"mode {self.mode!r} needs a value, e.g. {self.mode}:1")

    @classmethod
    def parse(cls, text: str) -> "ParamMode":
        text = text.strip()
        if text == "learn":
            return cls()
        kind, sep, val = text.partition(":")
        if not sep or kind not in ("init", "fixed"):
            raise FusionSpecError(f"parameter mode {text!r}: expected learn, init:v or fixed:v")
        return cls(kind, _num(val, f"parameter mode {text!r}"))

    @property
    def is_fixed(self) -> bool:
        return self.mode == "fixed"

    def initial(self, default: float) -> float:
        return default if self.value is None else self.value

    def __str__(self) -> str:
        return "learn" if self.mode == "learn" else f"{self.mode}:{_fmt(self.value)}"

    def describe(self, default: float) -> str:
        if self.mode == "learn":
            return ""
        return f"{'fixed' if self.is_fixed else 'init'} {_fmt(self.value)}"


LEARN = ParamMode()


@dataclass(frozen=True)
class BranchSpec:
    """What happens to one operand before the fusion op."""

    norm: str = "none"          # none | bn | nam
    weight: ParamMode = LEARN   # BN weight (norm == "bn" only)
    bias: ParamMode = LEARN     # BN bias (norm == "bn" only)
    act: str = "identity"       # identity | sigmoid
    offset: float = 0.0         # added after the activation

    def __post_init__(self):
        if self.norm not in ("none", "bn", "nam"):
            raise FusionSpecError(f"norm {self.norm!r}: expected none, bn or nam")
        if self.act not in ("identity", "sigmoid"):
            raise FusionSpecError(f"activation {self.act!r}: expected identity or sigmoid")
        if self.norm != "bn" and (self.weight != LEARN or self.bias != LEARN):
            raise FusionSpecError("BN weight/bias modes need norm 'bn'")
        if not math.isfinite(self.offset):
            raise FusionSpecError("offset must be finite")

    @classmethod
    def parse(cls, text: str) -> "BranchSpec":
        text = text.strip()
        if text in ("id", "identity", ""):
            return cls()
        norm, weight, bias, act, offset = "none", LEARN, LEARN, "identity", 0.0
        stage = 0  # 0: norm allowed, 1: act allowed, 2: offset allowed, 3: done
        for step in text.split("/"):
            head, *mods = step.split("@")
            if head in ("bn", "nam") and stage == 0:
                norm, stage = head, 1
                for mod in mods:
                    key, sep, val = mod.partition("=")
                    if not sep or key not in ("w", "b") or head != "bn":
                        raise FusionSpecError(f"branch step {step!r}: modifiers are @w=MODE and @b=MODE on bn")
                    if key == "w":
                        weight = ParamMode.parse(val)
                    else:
                        bias = ParamMode.parse(val)
                continue
            if mods:
                raise FusionSpecError(f"branch step {step!r}: only bn takes @ modifiers")
            if head in ("sig", "sigmoid") and stage <= 1:
                act, stage = "sigmoid", 2
            elif head.startswith("+") and stage <= 2:
                offset, stage = _num(head[1:], f"offset {head!r}"), 3
            else:
                raise FusionSpecError(
                    f"branch {text!r}: step {step!r} is unknown or out of order "
                    "(order: bn|nam, sig, +offset; e.g. bn@b=fixed:0/sig/+0.5)")
        return cls(norm, weight, bias, act, offset)

    def __str__(self) -> str:
        steps = []
        if self.norm == "bn":
            step = "bn"
            if self.weight != LEARN:
                step += f"@w={self.weight}"
            if self.bias != LEARN:
                step += f"@b={self.bias}"
            steps.append(step)
        elif self.norm == "nam":
            steps.append("nam")
        if self.act == "sigmoid":
            steps.append("sig")
        if self.offset != 0.0:
            steps.append(f"+{_fmt(self.offset)}")
        return "/".join(steps) or "id"

    def formula(self, operand: str) -> str:
        """Readable formula, e.g. ``sig(bn[b fixed 0](r)) + 0.5``."""
        t = operand
        if self.norm == "bn":
            notes = [n for n in (
                ("w " + self.weight.describe(1.0)) if self.weight != LEARN else "",
                ("b " + self.bias.describe(0.0)) if self.bias != LEARN else "") if n]
            t = f"bn{'[' + ', '.join(notes) + ']' if notes else ''}({t})"
        elif self.norm == "nam":
            t = f"nam({t})"
        if self.act == "sigmoid":
            t = f"sig({t})"
        if self.offset:
            t = f"{t} + {_fmt(self.offset)}"
        return t


ADAPTERS = ("conv1x1", "conv3x3", "pool")


@dataclass(frozen=True)
class GateSpec:
    """A gate inside the residual branch: ``out = act_out(conv2(conv_in(h))) * act(adapter(src))``.

    ``h`` is the output of the BN that precedes conv2 (``bn2`` in the WRN block).
    """

    adapter: str = "conv1x1"     # conv1x1 | conv3x3 | pool (global average pool, no parameters)
    source: str = "relu"         # adapter input: relu(h) | h ("bn")
    conv_input: str = "relu"     # conv2 input: relu(h) | h ("id") | sigmoid(h) ("sig")
    bn2_bias: ParamMode = LEARN  # the seed pins bn2's bias to 0 in some rows
    act: str = "sigmoid"         # on the adapter output: sigmoid | identity
    out_act: str = "identity"    # on the conv2 output before the product: identity | sigmoid

    def __post_init__(self):
        checks = (("adapter", self.adapter, ADAPTERS), ("source", self.source, ("relu", "bn")),
                  ("conv_input", self.conv_input, ("relu", "id", "sig")),
                  ("act", self.act, ("sigmoid", "identity")),
                  ("out_act", self.out_act, ("identity", "sigmoid")))
        for name, val, allowed in checks:
            if val not in allowed:
                raise FusionSpecError(f"gate {name} {val!r}: expected one of {', '.join(allowed)}")

    @classmethod
    def parse(cls, text: str) -> "GateSpec":
        head, *mods = text.strip().split("@")
        kw: dict = {"adapter": head}
        keys = {"src": "source", "conv": "conv_input", "bn2b": "bn2_bias", "act": "act", "out": "out_act"}
        alias = {"sig": "sigmoid", "id": "identity"}
        for mod in mods:
            key, sep, val = mod.partition("=")
            if not sep or key not in keys:
                raise FusionSpecError(f"gate modifier {mod!r}: expected one of {', '.join('@' + k + '=' for k in keys)}")
            if key == "bn2b":
                kw["bn2_bias"] = ParamMode.parse(val)
            elif key in ("act", "out"):
                kw[keys[key]] = alias.get(val, val)
            else:
                kw[keys[key]] = val
        return cls(**kw)

    def __str__(self) -> str:
        out = self.adapter
        if self.source != "relu":
            out += f"@src={self.source}"
        if self.conv_input != "relu":
            out += f"@conv={self.conv_input}"
        if self.bn2_bias != LEARN:
            out += f"@bn2b={self.bn2_bias}"
        if self.act != "sigmoid":
            out += "@act=id"
        if self.out_act != "identity":
            out += "@out=sig"
        return out

    def formula(self) -> str:
        h = "bn2" + (f"[b {self.bn2_bias.describe(0.0)}]" if self.bn2_bias != LEARN else "") + "(.)"
        src = h if self.source == "bn" else f"relu({h})"
        cin = {"relu": f"relu({h})", "id": h, "sig": f"sig({h})"}[self.conv_input]
        conv = f"conv2({cin})"
        if self.out_act == "sigmoid":
            conv = f"sig({conv})"
        ad = f"{self.adapter}({src})"
        if self.act == "sigmoid":
            ad = f"sig({ad})"
        return f"r = {conv} * {ad}"


@dataclass(frozen=True)
class FusionSpec:
    """``branch_r(r) OP branch_s(s)`` plus an optional gate inside the residual branch."""

    op: str = "add"
    r: BranchSpec = field(default_factory=lambda: BranchSpec(norm="bn"))
    s: BranchSpec = field(default_factory=BranchSpec)
    gate: GateSpec | None = None

    def __post_init__(self):
        if self.op not in ("add", "mul"):
            raise FusionSpecError(f"fusion op {self.op!r}: expected add or mul")

    @property
    def name(self) -> str:
        text = f"{self.op},r={self.r},s={self.s}"
        if self.gate is not None:
            text += f",gate={self.gate}"
        return text

    def __str__(self) -> str:
        return self.name

    def formula(self) -> str:
        sym = " + " if self.op == "add" else " * "
        parts = []
        for b, operand in ((self.r, "r"), (self.s, "s")):
            f = b.formula(operand)
            parts.append(f"({f})" if (self.op == "mul" and b.offset) else f)
        text = sym.join(parts)
        if self.gate is not None:
            text += f";  {self.gate.formula()}"
        return text

    def with_(self, **changes) -> "FusionSpec":
        return replace(self, **changes)


def parse_fusion(text: "str | FusionSpec") -> FusionSpec:
    """Parse a canonical fusion name (see module docstring). Specs pass through unchanged."""
    if isinstance(text, FusionSpec):
        return text
    if not isinstance(text, str):
        raise FusionSpecError(f"fusion must be a string or FusionSpec, got {type(text).__name__}")
    parts = [p.strip() for p in text.strip().split(",")]
    op = parts[0]
    if op not in ("add", "mul"):
        raise FusionSpecError(
            f"fusion {text!r}: must start with add or mul, e.g. 'add,r=bn,s=id' or 'mul,r=bn/sig,s=bn@b=fixed:1'")
    fields: dict = {}
    for part in parts[1:]:
        key, sep, val = part.partition("=")
        if not sep or key not in ("r", "s", "gate") or key in fields:
            raise FusionSpecError(f"fusion {text!r}: part {part!r} should be r=..., s=... or gate=... (each once)")
        fields[key] = val
    return FusionSpec(
        op=op,
        r=BranchSpec.parse(fields.get("r", "id")),
        s=BranchSpec.parse(fields.get("s", "id")),
        gate=GateSpec.parse(fields["gate"]) if "gate" in fields else None,
    )


ADD = parse_fusion("add,r=bn,s=id")
MUL_MEAN1 = parse_fusion("mul,r=bn@b=init:1,s=bn@b=init:1")


class PinnedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose affine weight / bias can be ``learn``, ``init:v`` or ``fixed:v``.

    A fixed value is not a parameter at all: it is a constant built in ``forward``, so it is
    re-imposed on every call and no optimizer step or weight decay can move it.
    """

    def __init__(self, num_features: int, weight: ParamMode = LEARN, bias: ParamMode = LEARN,
                 momentum: float = 0.1, eps: float = 1e-5):
        self.weight_mode, self.bias_mode = weight, bias
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        if weight.is_fixed:
            self.register_parameter("weight", None)
        if bias.is_fixed:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        wm = getattr(self, "weight_mode", LEARN)
        bm = getattr(self, "bias_mode", LEARN)
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(wm.initial(1.0))
            if self.bias is not None:
                self.bias.fill_(bm.initial(0.0))

    def _affine(self, x: torch.Tensor):
        w = self.weight if self.weight is not None else x.new_full((self.num_features,), self.weight_mode.value)
        b = self.bias if self.bias is not None else x.new_full((self.num_features,), self.bias_mode.value)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._affine(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x, self.running_mean, self.running_var, w, b,
            self.training or self.running_mean is None, factor, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight={self.weight_mode}, bias={self.bias_mode}"


class Branch(nn.Module):
    """One operand's transformation: norm -> act -> + offset."""

    def __init__(self, spec: BranchSpec, channels: int, role: str):
        super().__init__()
        self.spec = spec
        if spec.norm == "bn":
            self.norm = PinnedBatchNorm2d(channels, spec.weight, spec.bias)
        elif spec.norm == "nam":
            from .attention import NAM  # local import: attention imports gates only
            self.norm = NAM(channels)
        else:
            self.norm = nn.Identity()
        self.act = Gate("sigmoid", role=role) if spec.act == "sigmoid" else nn.Identity()
        self.offset = float(spec.offset)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = self.act(self.norm(t))
        return t + self.offset if self.offset else t


class Fusion(nn.Module):
    """``branch_r(r) OP branch_s(s)`` for (N, C, H, W) operands of equal shape."""

    def __init__(self, spec: "FusionSpec | str", channels: int):
        super().__init__()
        spec = parse_fusion(spec)
        self.spec = spec
        self.r = Branch(spec.r, channels, role="fusion.r")
        self.s = Branch(spec.s, channels, role="fusion.s")

    def forward(self, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        a, b = self.r(r), self.s(s)
        return a + b if self.spec.op == "add" else a * b

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}"
