"""Attention modules for the residual branch, built by name.

Every module maps ``x: (N, C, H, W)`` to a tensor of the same shape.  Every squashing function that
multiplies a feature map is a :class:`models.gates.Gate` with a ``role`` label, so probes can hook the
gate's input logits (:func:`models.gates.find_gates`).

Modules, papers and exact parameter counts, with ``h = max(1, C // reduction)``,
``m = max(8, C // reduction)``, ``p = len(pool_types)``, ``k = kernel_size``
(:func:`attention_param_count` evaluates these formulas):

* ``none``: ``nn.Identity``; 0 parameters, no gate.
* ``se``: :class:`SE` (Hu et al. 2018); ``2 C h``; 1 gate.
* ``cbam``: :class:`CBAM` (Woo et al. 2018); ``2 C h + h + C + 2 k^2 + 2``; 2 gates.
* ``triplet``: :class:`TripletAttention` (Misra et al. 2021); ``3 (p k^2 + 2)`` for any C (300 at
  ``p = 2, k = 7``), ``2 (p k^2 + 2)`` with ``no_spatial``; 3 (or 2) gates.
* ``ca``: :class:`CoordAtt` (Hou et al. 2021); ``3 C m + 3 m + 2 C``; 2 sigmoid gates and the hard
  sigmoid inside h_swish.
* ``nam``: :class:`NAM` (Liu et al. 2021); ``2 C``; 1 elementwise gate.
* ``lka``: :class:`LKA` (Guo et al. 2022, VAN); ``C^2 + 77 C``; no gate.
* ``triplet_ca``: :class:`TripletCA`; ``2 (p k^2 + 2)`` plus CA's count; 2 + 2 sigmoid gates and
  1 hard sigmoid.
* ``triplet_lka``: :class:`TripletLKA`; ``2 (p k^2 + 2)`` plus LKA's count; 2 gates.

The floors matter for small C: when ``reduction`` divides ``C`` the SE and CBAM counts are the usual
``2 C^2 / r`` and ``2 C^2 / r + C / r + C + 100`` (``k = 7``), but for ``C < r`` the hidden width is
clamped to 1.  CA has ``m = 8`` below ``C = 8 * reduction`` (about ``27 C``), about ``3 C^2 / reduction``
above.  LKA has ``C^2 + 77 C`` parameters (depthwise 5x5 with bias ``26 C``, dilated depthwise 7x7
with bias ``50 C``, pointwise 1x1 with bias ``C^2 + C``), not the ``C^2 + 80 C`` quoted in some
summaries.

All forwards are pure tensor programs (no in-place writes to inputs, no ``.item()``, no
data-dependent Python branching), so they run under ``torch.func.functional_call`` and
``torch.func.vmap`` in eval mode.  Each module only needs the channel count of the tensor it
receives: a Bottleneck block passes ``planes * expansion``.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from .gates import GATE_KINDS, Gate, HSwish

__all__ = [
    "ATTENTION_NAMES",
    "TRIPLET_ACTIVATIONS",
    "TRIPLET_POOL_PRESETS",
    "TRIPLET_POOL_TYPES",
    "CBAM",
    "LKA",
    "NAM",
    "SE",
    "CoordAtt",
    "TripletAttention",
    "TripletCA",
    "TripletLKA",
    "attention_param_count",
    "canonical_attention_name",
    "create_attention",
]

ATTENTION_NAMES = ("none", "se", "cbam", "triplet", "ca", "nam", "lka", "triplet_ca", "triplet_lka")

# Channel-pool statistics usable by the triplet branches (pooled over dim 1, keepdim):
#   avg    mean x              max   max x            median  lower median (torch.median)
#   l1     sum |x|  (L1 norm)  l2    sqrt(sum x^2)  (L2 norm)
# l1 / l2 are the norms, so they scale with the pooled length; the BN after the conv removes the scale.
TRIPLET_POOL_TYPES = ("avg", "max", "median", "l1", "l2")

# The seed's ``--pool 0..3`` choices.
TRIPLET_POOL_PRESETS = (("avg", "max"), ("avg", "max", "median"), ("l1", "max"), ("l2", "max"))

# Optional activation between the branch BN and its gate (the seed's ``--activation``).  A
# "sigmoid" here is a plain activation feeding the gate, not a gate: it multiplies nothing.
TRIPLET_ACTIVATIONS = ("none", "relu", "gelu", "leaky-relu", "celu", "elu", "sigmoid")


def _channel_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """One pooling statistic over dim 1: ``(N, D, A, B) -> (N, 1, A, B)``."""
    if kind == "avg":
        return x.mean(dim=1, keepdim=True)
    if kind == "max":
        return x.amax(dim=1, keepdim=True)
    if kind == "median":
        return torch.median(x, dim=1, keepdim=True).values
    if kind == "l1":
        return x.abs().sum(dim=1, keepdim=True)
    if kind == "l2":
        return torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True)
    raise ValueError(f"unknown pool type {kind!r}; valid pool types: {', '.join(TRIPLET_POOL_TYPES)}")


def _check_pool_types(pool_types: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(pool_types, str):
        pool_types = (pool_types,)
    pool_types = tuple(pool_types)
    if not pool_types:
        raise ValueError(f"pool_types is empty; choose from {', '.join(TRIPLET_POOL_TYPES)}")
    bad = [p for p in pool_types if p not in TRIPLET_POOL_TYPES]
    if bad:
        raise ValueError(
            f"unknown pool type(s) {', '.join(map(repr, bad))}; "
            f"valid pool types: {', '.join(TRIPLET_POOL_TYPES)}"
        )
    return pool_types


def _make_activation(activation: str | None) -> nn.Module:
    key = "none" if activation is None else activation.lower().replace("_", "-")
    if key in ("none", "identity"):
        return nn.Identity()
    if key == "relu":
        return nn.ReLU()
    if key == "gelu":
        return nn.GELU()
    if key == "leaky-relu":
        return nn.LeakyReLU(0.01)
    if key == "celu":
        return nn.CELU()
    if key == "elu":
        return nn.ELU()
    if key == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {activation!r}; valid activations: {', '.join(TRIPLET_ACTIVATIONS)}")


def _check_gate_kind(gate: str) -> str:
    if gate not in GATE_KINDS:
        raise ValueError(
            f"unknown gate {gate!r}; valid gates: {', '.join(GATE_KINDS)} "
            "(a softmax gate is not offered: over the batch dimension it couples samples)"
        )
    return gate


def _check_kernel_size(kernel_size: int) -> int:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    return kernel_size


class SE(nn.Module):
    """Squeeze-and-Excitation (Hu et al., arXiv:1709.01507): ``x * sigma(W2 relu(W1 GAP x))``.

    ``W1: C -> h`` and ``W2: h -> C`` are bias-free 1x1 convs with ``h = max(1, C // reduction)``,
    so the module has exactly ``2 C h`` parameters (``2 C^2 / r`` when ``r`` divides ``C``).
    One gate, role ``"se.channel"``, logits of shape ``(N, C, 1, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.gate = Gate("sigmoid", role="se.channel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        z = self.fc2(self.act(self.fc1(s)))  # (N, h, 1, 1) -> (N, C, 1, 1)
        return x * self.gate(z)  # (N, C, H, W)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., arXiv:1807.06521).

    Channel gate ``g_c = sigma(MLP(avg_hw x) + MLP(max_hw x))`` with one shared MLP
    ``Linear(C, h) - ReLU - Linear(h, C)`` (both with bias, ``h = max(1, C // reduction)``), then
    spatial gate ``g_s = sigma(BN(conv_kxk([max_c y; mean_c y])))`` on ``y = x * g_c``
    (conv 2 -> 1 without bias, BN over 1 channel).  Output ``y * g_s``.

    Parameters: ``2 C h + h + C`` (MLP) ``+ 2 k^2 + 2`` (conv + BN); ``2C^2/r + C/r + C + 100`` at
    ``k = 7`` when ``r`` divides ``C``.  The spatial BN weight starts at 0, so at initialisation the
    spatial gate is the constant ``sigma(0) = 1/2`` and the spatial conv receives zero gradient until
    that weight moves away from 0 (its ``.grad`` is defined, but zero, on the first step).
    Gates: ``"cbam.channel"`` (logits ``(N, C, 1, 1)``), ``"cbam.spatial"`` (logits ``(N, 1, H, W)``).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(1, channels // reduction)
        k = _check_kernel_size(kernel_size)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.channel_gate = Gate("sigmoid", role="cbam.channel")
        self.spatial_conv = nn.Conv2d(2, 1, k, padding=(k - 1) // 2, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1)
        nn.init.zeros_(self.spatial_bn.weight)
        self.spatial_gate = Gate("sigmoid", role="cbam.spatial")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3)))  # (N, C)
        mx = self.mlp(x.amax(dim=(2, 3)))  # (N, C)
        z_c = (avg + mx)[:, :, None, None]  # (N, C, 1, 1)
        y = x * self.channel_gate(z_c)  # (N, C, H, W)
        pooled = torch.cat([y.amax(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)], dim=1)  # (N, 2, H, W)
        z_s = self.spatial_bn(self.spatial_conv(pooled))  # (N, 1, H, W)
        return y * self.spatial_gate(z_s)  # (N, C, H, W)


class _PooledGate(nn.Module):
    """One triplet branch without its rotation: ``(N, D, A, B) -> gate (N, 1, A, B)``.

    Pool over dim 1 with each of ``pool_types`` (stacked in that order), conv kxk (``p -> 1``, no
    bias), BN(1), optional activation, :class:`Gate`.  Parameters ``p k^2 + 2``.
    """

    def __init__(self, pool_types: tuple[str, ...], kernel_size: int, gate: str, activation: str | None, role: str):
        super().__init__()
        self.pool_types = pool_types
        self.conv = nn.Conv2d(len(pool_types), 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)
        self.act = _make_activation(activation)
        self.gate = Gate(gate, role=role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([_channel_pool(x, kind) for kind in self.pool_types], dim=1)  # (N, p, A, B)
        z = self.act(self.bn(self.conv(pooled)))  # (N, 1, A, B)
        return self.gate(z)  # (N, 1, A, B)

    def extra_repr(self) -> str:
        return f"pool_types={self.pool_types}"


class TripletAttention(nn.Module):
    """Triplet attention (Misra et al., arXiv:2010.03045): three rotated pooled-conv gates, averaged.

    Branches (each a pool - conv kxk - BN - [activation] - gate on a rotated view of ``x``):

    * ``cw`` (role ``"triplet.cw"``): view ``(N, H, C, W)``, pool over H, gate ``(N, C, 1, W)``;
    * ``hc`` (role ``"triplet.hc"``): view ``(N, W, H, C)``, pool over W, gate ``(N, C, H, 1)``;
    * ``hw`` (role ``"triplet.hw"``): plain ``(N, C, H, W)``, pool over C, gate ``(N, 1, H, W)``.

    Output ``mean_b (x * g_b)``: of 3 branches, or of the first 2 with ``no_spatial=True``.  The
    H-W branch can be swapped for Coordinate Attention (``spatial="ca"``, :class:`TripletCA`) or LKA
    (``spatial="lka"``, :class:`TripletLKA`); those need ``channels``, the plain module ignores it.

    Parameters ``3 (p k^2 + 2)`` (300 at the default ``p = 2, k = 7``, any C); ``2 (p k^2 + 2)`` with
    ``no_spatial``.  ``gate`` is the gate kind of the pooled branches (``"sigmoid"`` or ``"tanh"``;
    ``"hard_sigmoid"`` also works); ``activation`` is applied between BN and the gate (see
    :data:`TRIPLET_ACTIVATIONS`); ``pool_types`` from :data:`TRIPLET_POOL_TYPES`.
    """

    def __init__(
        self,
        channels: int | None = None,
        kernel_size: int = 7,
        pool_types: str | Sequence[str] = ("max", "avg"),
        gate: str = "sigmoid",
        activation: str | None = None,
        no_spatial: bool = False,
        spatial: str = "conv",
        reduction: int = 32,
    ):
        super().__init__()
        pools = _check_pool_types(pool_types)
        k = _check_kernel_size(kernel_size)
        _check_gate_kind(gate)
        _make_activation(activation)  # validate early, even if only used in branches below
        self.no_spatial = no_spatial
        self.cw = _PooledGate(pools, k, gate, activation, role="triplet.cw")
        self.hc = _PooledGate(pools, k, gate, activation, role="triplet.hc")
        self.spatial = spatial
        if no_spatial:
            self.hw = None
        elif spatial == "conv":
            self.hw = _PooledGate(pools, k, gate, activation, role="triplet.hw")
        elif spatial in ("ca", "lka"):
            if channels is None:
                raise ValueError(f"TripletAttention(spatial={spatial!r}) needs the channel count")
            self.hw = CoordAtt(channels, reduction) if spatial == "ca" else LKA(channels)
        else:
            raise ValueError(f"unknown spatial branch {spatial!r}; valid: conv, ca, lka")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_cw = self.cw(x.transpose(1, 2)).transpose(1, 2)  # (N, H, C, W) -> (N, 1, C, W) -> (N, C, 1, W)
        g_hc = self.hc(x.transpose(1, 3)).transpose(1, 3)  # (N, W, H, C) -> (N, 1, H, C) -> (N, C, H, 1)
        out = x * g_cw + x * g_hc  # (N, C, H, W)
        if self.hw is None:
            return out / 2
        if self.spatial == "conv":
            y_hw = x * self.hw(x)  # (N, C, H, W) * (N, 1, H, W)
        else:
            y_hw = self.hw(x)  # (N, C, H, W), CA or LKA applied to x
        return (out + y_hw) / 3


class TripletCA(TripletAttention):
    """Triplet attention whose H-W branch is Coordinate Attention on ``x`` (mean of 3 branches).

    Parameters ``2 (p k^2 + 2) + 3 C m + 3 m + 2 C`` with ``m = max(8, C // reduction)``.  Gates: the
    two triplet gates (kind ``gate``) and CA's two sigmoid gates plus its hard sigmoid.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        pool_types: str | Sequence[str] = ("max", "avg"),
        gate: str = "sigmoid",
        activation: str | None = None,
        reduction: int = 32,
    ):
        super().__init__(channels, kernel_size, pool_types, gate, activation, spatial="ca", reduction=reduction)


class TripletLKA(TripletAttention):
    """Triplet attention whose H-W branch is LKA on ``x`` (mean of 3 branches).

    Parameters ``2 (p k^2 + 2) + C^2 + 77 C``.  Gates: the two triplet gates only.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        pool_types: str | Sequence[str] = ("max", "avg"),
        gate: str = "sigmoid",
        activation: str | None = None,
    ):
        super().__init__(channels, kernel_size, pool_types, gate, activation, spatial="lka")


class CoordAtt(nn.Module):
    """Coordinate Attention (Hou et al., arXiv:2103.02907): ``x * g_h * g_w``.

    Directional means ``mean_W x -> (N, C, H, 1)`` and ``mean_H x -> (N, C, W, 1)`` are concatenated
    along the spatial axis, mixed by ``conv1`` (1x1, ``C -> m`` with bias, ``m = max(8, C // reduction)``),
    BN(m) and h_swish, split back, and mapped by ``conv_h`` / ``conv_w`` (1x1, ``m -> C`` with bias) to
    sigmoid gates ``g_h: (N, C, H, 1)`` (role ``"ca.h"``) and ``g_w: (N, C, 1, W)`` (role ``"ca.w"``).

    Parameters ``(C m + m) + 2 m + 2 (m C + C) = 3 C m + 3 m + 2 C``.  Gates: 2 sigmoid plus the
    hard sigmoid inside h_swish (role ``"ca.h_swish"``).
    """

    def __init__(self, channels: int, reduction: int = 32):
        super().__init__()
        mip = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, 1)
        self.bn = nn.BatchNorm2d(mip)
        self.act = HSwish(role="ca.h_swish")
        self.conv_h = nn.Conv2d(mip, channels, 1)
        self.conv_w = nn.Conv2d(mip, channels, 1)
        self.gate_h = Gate("sigmoid", role="ca.h")
        self.gate_w = Gate("sigmoid", role="ca.w")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1)
        x_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        y = self.act(self.bn(self.conv1(torch.cat([x_h, x_w], dim=2))))  # (N, m, H + W, 1)
        y_h, y_w = torch.split(y, [h, w], dim=2)  # (N, m, H, 1), (N, m, W, 1)
        g_h = self.gate_h(self.conv_h(y_h))  # (N, C, H, 1)
        g_w = self.gate_w(self.conv_w(y_w.transpose(2, 3)))  # (N, C, 1, W)
        return x * g_h * g_w  # (N, C, H, W)


class NAM(nn.Module):
    """Normalization-based attention, channel version (Liu et al., arXiv:2111.12419).

    ``x * sigma(w_c * BN(x))`` with ``w_c = |gamma_c| / sum_j |gamma_j|`` from the BN weight,
    detached: the BN weight gets gradient only through the normalised path ``gamma * x_hat``, never
    through ``w``.  Parameters ``2 C`` (the BN).  One elementwise gate, role ``"nam"``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.gate = Gate("sigmoid", role="nam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.bn.weight.detach().abs()  # (C,)
        w = (gamma / gamma.sum())[None, :, None, None]  # (1, C, 1, 1)
        z = self.bn(x) * w  # (N, C, H, W)
        return x * self.gate(z)  # (N, C, H, W)


class LKA(nn.Module):
    """Large-kernel attention from VAN (Guo et al., arXiv:2202.09741): ``x * A(x)``, no squashing.

    ``A = conv1x1(dwconv7x7_dilation3(dwconv5x5(x)))``, every conv with bias: ``26 C + 50 C + C^2 + C
    = C^2 + 77 C`` parameters.  The product is a raw signed multiplication, so there is no gate.
    Works for any spatial size (padding keeps H x W).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv_spatial = nn.Conv2d(channels, channels, 7, padding=9, dilation=3, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(self.conv_spatial(self.conv0(x)))  # (N, C, H, W)
        return x * a  # (N, C, H, W)


_BUILDERS: dict[str, type[nn.Module]] = {
    "se": SE,
    "cbam": CBAM,
    "triplet": TripletAttention,
    "ca": CoordAtt,
    "nam": NAM,
    "lka": LKA,
    "triplet_ca": TripletCA,
    "triplet_lka": TripletLKA,
}

# Spellings accepted besides the canonical names, keyed after lowercasing and dropping "_", "-", " ".
_ALIASES = {
    "none": "none",
    "identity": "none",
    "se": "se",
    "cbam": "cbam",
    "triplet": "triplet",
    "tripletattention": "triplet",
    "ca": "ca",
    "coordatt": "ca",
    "coordinateattention": "ca",
    "nam": "nam",
    "lka": "lka",
    "tripletca": "triplet_ca",
    "tripletlka": "triplet_lka",
}


def canonical_attention_name(name: str | None) -> str:
    """The canonical name (one of :data:`ATTENTION_NAMES`) for ``name``; ``None`` means ``"none"``.

    Case-insensitive; ``_``, ``-`` and spaces are ignored, so the seed's ``"TripletAttention"``,
    ``"TripletCA"``, ``"CA"``, ``"None"`` work.  Unknown names raise ``ValueError`` naming close matches.
    """
    if name is None:
        return "none"
    key = "".join(ch for ch in name.lower() if ch not in "_- ")
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, sorted(_ALIASES), n=5, cutoff=0.6)
    close = list(dict.fromkeys(_ALIASES[c] for c in close))  # canonical names, best first
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise ValueError(f"unknown attention {name!r}{hint}; valid names: {', '.join(ATTENTION_NAMES)}")


def create_attention(name: str | None, channels: int, **kwargs) -> nn.Module:
    """Build the attention module ``name`` for ``channels`` input channels.

    ``kwargs`` go to the module's constructor (e.g. ``reduction=8`` for SE, ``pool_types=("l2",
    "max")`` for Triplet).  ``"none"`` / ``None`` returns ``nn.Identity()`` and ignores ``kwargs``.
    """
    key = canonical_attention_name(name)
    if key == "none":
        return nn.Identity()
    return _BUILDERS[key](channels, **kwargs)


def _arguments(key: str, channels: int, kwargs: dict) -> dict:
    """Constructor arguments with defaults filled in (TypeError for unknown keywords)."""
    bound = inspect.signature(_BUILDERS[key]).bind(channels, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _triplet_branch_params(pool_types, kernel_size: int) -> int:
    return len(_check_pool_types(pool_types)) * kernel_size**2 + 2


def _ca_params(c: int, reduction: int) -> int:
    m = max(8, c // reduction)
    return 3 * c * m + 3 * m + 2 * c


def _lka_params(c: int) -> int:
    return c * c + 77 * c


def attention_param_count(name: str | None, channels: int, **kwargs) -> int:
    """Closed-form number of trainable parameters of ``create_attention(name, channels, **kwargs)``.

    Evaluated from the formulas in this module's docstring (not by building the module); keyword
    defaults are read from the constructor signatures so the two cannot drift apart.
    """
    key = canonical_attention_name(name)
    c = channels
    if key == "none":
        return 0
    a = _arguments(key, channels, kwargs)
    if key == "se":
        h = max(1, c // a["reduction"])
        return 2 * c * h
    if key == "cbam":
        h = max(1, c // a["reduction"])
        return 2 * c * h + h + c + 2 * a["kernel_size"] ** 2 + 2
    if key == "ca":
        return _ca_params(c, a["reduction"])
    if key == "nam":
        return 2 * c
    if key == "lka":
        return _lka_params(c)
    branch = _triplet_branch_params(a["pool_types"], a["kernel_size"])
    if key == "triplet_ca":
        return 2 * branch + _ca_params(c, a["reduction"])
    if key == "triplet_lka":
        return 2 * branch + _lka_params(c)
    # key == "triplet"
    if a["no_spatial"]:
        return 2 * branch
    if a["spatial"] == "ca":
        return 2 * branch + _ca_params(c, a["reduction"])
    if a["spatial"] == "lka":
        return 2 * branch + _lka_params(c)
    return 3 * branch
