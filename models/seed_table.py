"""The seed experiments' fusion variants (WRN-16-10 on Caltech-101 at 64x64, best test top-1).

Each row: an id (``fmm01`` ...), the group it was reported in, the seed's own code, the canonical
fusion spec, and the reported accuracy. In the seed's "sig, bn" group the BN named ``bn`` acts on
the shortcut and ``bn_s`` on the residual; specs here always name operands (``r`` = conv2
output, ``s`` = shortcut(x)), so "bn_s b=1" in that group is ``r=bn@b=fixed:1``. ``b=1`` written
as ``.data[:] = 1`` inside ``forward`` is ``fixed:1``. The in-branch gate rows do not record
their fusion or adapter; they use the baseline fusion ``bn(r) + s`` and a strided 1x1 conv adapter.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from .fusion import FusionSpec, FusionSpecError, parse_fusion

__all__ = ["SeedFusion", "SEED_FUSIONS", "seed_fusion", "resolve_fusion"]


@dataclass(frozen=True)
class SeedFusion:
    id: str
    group: str
    seed_code: str
    spec: FusionSpec
    caltech101_top1: float

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def formula(self) -> str:
        return self.spec.formula()

    def as_dict(self) -> dict:
        return {"id": self.id, "group": self.group, "name": self.name, "formula": self.formula,
                "seed_code": self.seed_code, "caltech101_top1": self.caltech101_top1}


_G = "add,r=bn,s=id,gate=conv1x1"
_ROWS = [
    # group "bn, sig": sigmoid on the residual
    ("bn,sig", "out = self.bn(out) + self.shortcut(x)", "add,r=bn,s=id", 87.62),
    ("bn,sig", "out = (out.sigmoid() + 1) * self.bn_s(self.shortcut(x))", "mul,r=sig/+1,s=bn", 78.23),
    ("bn,sig", "out = (self.bn(out).sigmoid() + 1) * self.bn_s(self.shortcut(x))", "mul,r=bn/sig/+1,s=bn", 78.69),
    ("bn,sig", "out = (self.bn(out).sigmoid() + 0.5) * self.bn_s(self.shortcut(x))", "mul,r=bn/sig/+0.5,s=bn", 78.57),
    ("bn,sig", "bn_s.bias=1; (self.bn(out).sigmoid() + 1) * self.bn_s(self.shortcut(x))", "mul,r=bn/sig/+1,s=bn@b=fixed:1", 82.26),
    ("bn,sig", "bn_s.bias=1; (self.bn(out).sigmoid() + 0.5) * self.bn_s(self.shortcut(x))", "mul,r=bn/sig/+0.5,s=bn@b=fixed:1", 84.10),
    ("bn,sig", "bn.bias=0; bn_s.bias=1; (self.bn(out).sigmoid() + 0.5) * self.bn_s(self.shortcut(x))", "mul,r=bn@b=fixed:0/sig/+0.5,s=bn@b=fixed:1", 84.85),
    ("bn,sig", "bn.bias=0; bn_s.bias=1; self.bn(out).sigmoid() * self.bn_s(self.shortcut(x))", "mul,r=bn@b=fixed:0/sig,s=bn@b=fixed:1", 85.83),
    ("bn,sig", "bn.bias=0; bn.weight=1; bn_s.bias=1; self.bn(out).sigmoid() * self.bn_s(self.shortcut(x))", "mul,r=bn@w=fixed:1@b=fixed:0/sig,s=bn@b=fixed:1", 81.57),
    # group "sig, bn": sigmoid on the shortcut (seed's `bn` acts on s, `bn_s` on r)
    ("sig,bn", "out = (self.shortcut(x).sigmoid() + 1) * self.bn_s(out)", "mul,r=bn,s=sig/+1", 83.93),
    ("sig,bn", "out = (self.bn(self.shortcut(x)).sigmoid() + 1) * self.bn_s(out)", "mul,r=bn,s=bn/sig/+1", 85.54),
    ("sig,bn", "out = (self.bn(self.shortcut(x)).sigmoid() + 0.5) * self.bn_s(out)", "mul,r=bn,s=bn/sig/+0.5", 85.14),
    ("sig,bn", "bn_s.bias=1; (self.bn(self.shortcut(x)).sigmoid() + 1) * self.bn_s(out)", "mul,r=bn@b=fixed:1,s=bn/sig/+1", 85.43),
    ("sig,bn", "bn_s.bias=1; (self.bn(self.shortcut(x)).sigmoid() + 0.5) * self.bn_s(out)", "mul,r=bn@b=fixed:1,s=bn/sig/+0.5", 87.44),
    ("sig,bn", "bn.bias=0; bn_s.bias=1; (self.bn(self.shortcut(x)).sigmoid() + 0.5) * self.bn_s(out)", "mul,r=bn@b=fixed:1,s=bn@b=fixed:0/sig/+0.5", 84.39),
    ("sig,bn", "bn.bias=0; bn_s.bias=1; self.bn(self.shortcut(x)).sigmoid() * self.bn_s(out)", "mul,r=bn@b=fixed:1,s=bn@b=fixed:0/sig", 84.39),
    ("sig,bn", "bn.bias=0; bn.weight=1; bn_s.bias=1; self.bn(self.shortcut(x)).sigmoid() * self.bn_s(out)", "mul,r=bn@b=fixed:1,s=bn@w=fixed:1@b=fixed:0/sig", 84.91),
    # group "bn, bn"
    ("bn,bn", "out = self.bn(out) * self.bn_s(self.shortcut(x))", "mul,r=bn,s=bn", 77.13),
    ("bn,bn", "bn_s.bias=1; self.bn(out) * self.bn_s(self.shortcut(x))", "mul,r=bn,s=bn@b=fixed:1", 75.75),
    ("bn,bn", "bn.bias=1; self.bn(out) * self.bn_s(self.shortcut(x))", "mul,r=bn@b=fixed:1,s=bn", 79.55),
    ("bn,bn", "bn.bias=1; bn_s.bias=1; self.bn(out) * self.bn_s(self.shortcut(x))", "mul,r=bn@b=fixed:1,s=bn@b=fixed:1", 81.39),
    ("bn,bn", "bn.bias=1; bn.weight=1; bn_s.bias=1; self.bn(out) * self.bn_s(self.shortcut(x))", "mul,r=bn@w=fixed:1@b=fixed:1,s=bn@b=fixed:1", 81.05),
    ("bn,bn", "bn.bias=1; bn_s.bias=1; bn_s.weight=1; self.bn(out) * self.bn_s(self.shortcut(x))", "mul,r=bn@b=fixed:1,s=bn@w=fixed:1@b=fixed:1", 80.24),
    ("bn,bn", "bn.bias=1; bn.weight=1; bn_s.bias=1; bn_s.weight=1; self.bn(out) * self.bn_s(self.shortcut(x))", "mul,r=bn@w=fixed:1@b=fixed:1,s=bn@w=fixed:1@b=fixed:1", 81.22),
    # group "sig, sig" without BN (the sigmoids saturate)
    ("sig,sig", "out = self.shortcut(x).sigmoid() * out.sigmoid()", "mul,r=sig,s=sig", 79.44),
    ("sig,sig", "out = self.shortcut(x).sigmoid() * (out.sigmoid() + 0.5)", "mul,r=sig/+0.5,s=sig", 70.05),
    ("sig,sig", "out = (self.shortcut(x).sigmoid() + 0.5) * out.sigmoid()", "mul,r=sig,s=sig/+0.5", 76.61),
    ("sig,sig", "out = self.shortcut(x).sigmoid() * (out.sigmoid() + 1)", "mul,r=sig/+1,s=sig", 72.64),
    ("sig,sig", "out = (self.shortcut(x).sigmoid() + 1) * out.sigmoid()", "mul,r=sig,s=sig/+1", 71.77),
    # group "sig, sig" with BN on one side
    ("sig,sig+bn1", "out = self.shortcut(x).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn/sig,s=sig", 86.69),
    ("sig,sig+bn1", "out = self.bn_s(self.shortcut(x)).sigmoid() * out.sigmoid()", "mul,r=sig,s=bn/sig", 79.90),
    ("sig,sig+bn1", "bn_s.bias=0; self.bn_s(self.shortcut(x)).sigmoid() * out.sigmoid()", "mul,r=sig,s=bn@b=fixed:0/sig", 76.32),
    ("sig,sig+bn1", "bn.bias=0; self.shortcut(x).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn@b=fixed:0/sig,s=sig", 83.99),
    ("sig,sig+bn1", "bn.bias=0; self.shortcut(x).sigmoid() * (self.bn(out).sigmoid() + 0.5)", "mul,r=bn@b=fixed:0/sig/+0.5,s=sig", 86.52),
    ("sig,sig+bn1", "bn.bias=0; self.shortcut(x).sigmoid() * (self.bn(out).sigmoid() + 1)", "mul,r=bn@b=fixed:0/sig/+1,s=sig", 82.83),
    ("sig,sig+bn1", "bn.weight=1; self.shortcut(x).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn@w=fixed:1/sig,s=sig", 78.74),
    ("sig,sig+bn1", "bn_s.bias=0; (self.bn_s(self.shortcut(x)).sigmoid() + 0.5) * out.sigmoid()", "mul,r=sig,s=bn@b=fixed:0/sig/+0.5", 73.39),
    # group "sig, sig" with BN on both sides
    ("sig,sig+bn2", "out = self.bn_s(self.shortcut(x)).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn/sig,s=bn/sig", 86.23),
    ("sig,sig+bn2", "bn.bias=0; self.bn_s(self.shortcut(x)).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn@b=fixed:0/sig,s=bn/sig", 86.41),
    ("sig,sig+bn2", "bn.bias=0; self.bn_s(self.shortcut(x)).sigmoid() * (self.bn(out).sigmoid() + 1)", "mul,r=bn@b=fixed:0/sig/+1,s=bn/sig", 85.83),
    ("sig,sig+bn2", "bn.bias=0; self.bn_s(self.shortcut(x)).sigmoid() * (self.bn(out).sigmoid() + 0.5)", "mul,r=bn@b=fixed:0/sig/+0.5,s=bn/sig", 86.23),
    ("sig,sig+bn2", "bn.bias=0; bn_s.bias=0; self.bn_s(self.shortcut(x)).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn@b=fixed:0/sig,s=bn@b=fixed:0/sig", 86.52),
    ("sig,sig+bn2", "bn.bias=0; bn_s.bias=0; bn_s.weight=1; self.bn_s(self.shortcut(x)).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn@b=fixed:0/sig,s=bn@w=fixed:1@b=fixed:0/sig", 82.49),
    ("sig,sig+bn2", "bn.bias=0; bn.weight=1; bn_s.bias=0; self.bn_s(self.shortcut(x)).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn@w=fixed:1@b=fixed:0/sig,s=bn@b=fixed:0/sig", 83.47),
    ("sig,sig+bn2", "bn.bias=0; bn_s.bias=0; self.bn_s(self.shortcut(x)).sigmoid() * (self.bn(out).sigmoid() + 0.5)", "mul,r=bn@b=fixed:0/sig/+0.5,s=bn@b=fixed:0/sig", 84.91),
    ("sig,sig+bn2", "bn.bias=0; bn_s.bias=0; (self.bn_s(self.shortcut(x)).sigmoid() + 0.5) * self.bn(out).sigmoid()", "mul,r=bn@b=fixed:0/sig,s=bn@b=fixed:0/sig/+0.5", 86.92),
    ("sig,sig+bn2", "bn.bias=0; bn_s.bias=0; (self.bn_s(self.shortcut(x)).sigmoid() + 1) * self.bn(out).sigmoid()", "mul,r=bn@b=fixed:0/sig,s=bn@b=fixed:0/sig/+1", 86.75),
    ("sig,sig+bn2", "bn.bias=0; bn_s.bias=0; (self.bn_s(self.shortcut(x)).sigmoid() + 0.5) * (self.bn(out).sigmoid() + 0.5)", "mul,r=bn@b=fixed:0/sig/+0.5,s=bn@b=fixed:0/sig/+0.5", 84.79),
    ("sig,sig+bn2", "bn.weight=1; self.bn_s(self.shortcut(x)).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn@w=fixed:1/sig,s=bn/sig", 81.91),
    ("sig,sig+bn2", "bn_s.weight=1; self.bn_s(self.shortcut(x)).sigmoid() * self.bn(out).sigmoid()", "mul,r=bn/sig,s=bn@w=fixed:1/sig", 80.93),
    # group "gate inside the residual branch" (h = bn2 output; fusion: baseline)
    ("resgate", "out_1 = relu(bn2(out_1)); out = conv2(out_1); out *= adap(out_1)", _G + "@act=id", 86.06),
    ("resgate", "out_1 = relu(bn2(out_1)); out = conv2(out_1); out *= adap(out_1).sigmoid()", _G, 87.33),
    ("resgate", "out_1 = bn2(out_1); out = conv2(out_1); out *= adap(out_1).sigmoid()", _G + "@src=bn@conv=id", 85.71),
    ("resgate", "out_1 = bn2(out_1); out = conv2(out_1.relu()); out *= adap(out_1).sigmoid()", _G + "@src=bn", 87.85),
    ("resgate", "bn2.bias=0; out_1 = bn2(out_1); out = conv2(out_1); out *= adap(out_1).sigmoid()", _G + "@src=bn@conv=id@bn2b=fixed:0", 86.64),
    ("resgate", "bn2.bias=0; out_1 = bn2(out_1); out = conv2(out_1.relu()); out *= adap(out_1).sigmoid()", _G + "@src=bn@bn2b=fixed:0", 81.51),
    ("resgate", "bn2.bias=0; out_1 = bn2(out_1); out = conv2(out_1.sigmoid()); out *= adap(out_1).sigmoid()", _G + "@src=bn@conv=sig@bn2b=fixed:0", 82.66),
    ("resgate", "out_1 = relu(bn2(out_1)); out = conv2(out_1).sigmoid(); out = adap(out_1) * out", _G + "@act=id@out=sig", 84.22),
    # NAM on the shortcut
    ("nam", "out = self.nam(x) + self.bn_s(out)", "add,r=bn,s=nam", 86.41),
]

SEED_FUSIONS: tuple[SeedFusion, ...] = tuple(
    SeedFusion(f"fmm{i:02d}", group, code, parse_fusion(spec), acc)
    for i, (group, code, spec, acc) in enumerate(_ROWS, start=1)
)
_BY_ID = {row.id: row for row in SEED_FUSIONS}


def seed_fusion(row_id: str) -> SeedFusion:
    try:
        return _BY_ID[row_id]
    except KeyError:
        close = difflib.get_close_matches(row_id, list(_BY_ID), n=3)
        raise FusionSpecError(f"unknown seed fusion {row_id!r}" + (f"; did you mean {', '.join(close)}?" if close else "")) from None


def resolve_fusion(text: "str | FusionSpec") -> FusionSpec:
    """A canonical fusion name, a seed row id (``fmm08``) or the aliases ``add`` / ``mul``."""
    if isinstance(text, FusionSpec):
        return text
    key = text.strip()
    if key in _BY_ID:
        return _BY_ID[key].spec
    if key == "add":
        return parse_fusion("add,r=bn,s=id")
    if key == "mul":
        return parse_fusion("mul,r=bn@b=init:1,s=bn@b=init:1")
    if key.startswith("fmm"):
        seed_fusion(key)  # raises with close matches
    return parse_fusion(key)
