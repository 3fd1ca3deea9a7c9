"""Empirical neural tangent kernel (NTK) of any PyTorch model, its spectrum, and matrix-free top-k.

For a model f(theta, x) with O outputs and the (selected) parameters theta (P elements), the
empirical NTK between inputs x1 (N1 samples) and x2 (N2 samples) is

    Theta[i, a, j, b] = < d f_a(x1_i) / d theta , d f_b(x2_j) / d theta >       (J1 J2^T)

Kinds (:class:`NtkKind`), with their axis conventions:

* ``full``      (N1*O, N2*O), **sample-major**: row ``i*O + a`` is (sample i, output a), i.e. the
                 (N1, O, N2, O) array reshaped; ``kernel.reshape(N1, O, N2, O)`` recovers the axes.
* ``trace``     (N1, N2): sum over outputs, ``Theta[i, :, j, :].trace()``.
* ``diagonal``  (O, N1, N2): one kernel per output, ``kernel[a] = Theta[:, a, :, a]``.

Every method evaluates the model in eval mode with explicit parameters and buffers
(``torch.func.functional_call``): BatchNorm uses its running statistics (``bn_mode="eval"``),
dropout is off, and the caller's module (parameters, buffers, ``requires_grad`` and train/eval
flags) is unchanged afterwards. Kernels are accumulated and returned in float64; Jacobians are
formed in ``dtype`` (the model's own dtype unless given; pass ``torch.float64`` for exact work on
small N, e.g. before eigen-decompositions and eigenlearning).

The methods (:class:`NtkMethod`) follow the cost analysis of neural-tangents (Novak et al. 2022) and
the PyTorch ``torch.func`` NTK tutorial; ``layerwise`` uses the per-sample-gradient identity of
linear maps (a Linear/Conv2d weight Jacobian is a sum over positions of outer products of the
back-propagated output gradient and the layer input; BatchNorm's affine Jacobian is a sum of
``g * x_hat``), contracted one layer at a time so the whole Jacobian is never stored.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from probe._func import FunctionalModel, ParamFilter, eval_mode, functionalize
from probe.errors import UserError

__all__ = ["NtkKind", "NtkMethod", "LanczosMethod", "NtkResult", "SpectrumResult", "LanczosResult",
           "empirical_ntk", "ntk_spectrum", "ntk_topk_lanczos"]


DEFAULT_MEMORY_BUDGET = 2 * 2 ** 30
"""Default ``memory_budget_bytes`` (2 GiB, as ``probe ntk --memory-gb``)."""


class NtkKind(str, Enum):
    """Which kernel to form (see the module docstring for the axis conventions)."""

    FULL = "full"
    """(N1*O, N2*O), sample-major; memory N1*N2*O^2 float64."""
    TRACE = "trace"
    """(N1, N2), summed over outputs; memory N1*N2 float64."""
    DIAGONAL = "diagonal"
    """(O, N1, N2), one kernel per output; memory O*N1*N2 float64."""


class NtkMethod(str, Enum):
    """How the kernel is computed. N = N1 + N2 samples, O outputs, P parameters, [FP] one forward
    pass of one sample, A the activations saved for the backward pass of one sample."""

    AUTO = "auto"
    """Pick the cheapest method whose memory plan fits ``memory_budget_bytes`` (cost model in
    :func:`empirical_ntk`)."""
    JACOBIAN = "jacobian"
    """Per-sample Jacobians by ``vmap(jacrev)`` on blocks of samples, contracted block pair by block
    pair. Time N*(1 + 2*O)*[FP] + N1*N2*O*P (trace, diagonal) or N1*N2*O^2*P (full); memory
    N*O*P when every Jacobian fits, otherwise 2*b*O*P for blocks of b samples (Jacobians of
    column blocks are then recomputed once per row block) or, below one sample, per parameter
    group."""
    NTVP = "ntvp"
    """NTK-vector products: one VJP per column (sample j, output b) gives the parameter tangent
    d f_b(x2_j)/d theta, one JVP over the row samples gives a whole kernel column. No Jacobian is
    stored. Time ~N2*O*(3 + 2.5*N1)*[FP]; memory c*P + c*b*A for c columns and b rows at once."""
    LAYERWISE = "layerwise"
    """Structured per-layer contraction, no vmap. One batched forward pass over a block pair, then
    per output one backward pass; as the gradient g at a Linear/Conv2d/BatchNorm output arrives,
    that layer's per-sample Jacobian is rebuilt from (layer input, g) -- a sum over positions of
    outer products, or sum g * x_hat for BatchNorm -- and contracted into the kernel before the
    next layer's gradient exists. Layers with few positions T are contracted without forming
    it, through the Gram identity sum_ts (a_it . a_js)(g_it . g_js) (cost T^2*(d_in + d_out)
    instead of d_in*d_out per sample pair). Time ~N*(1 + 2*O)*[FP] + N1*N2*O*P; memory per sample
    ~2A + one layer's Jacobian row and input patches, instead of O*P (``full`` keeps all O
    output gradients per layer). Parameters elsewhere (or failing the built-in exactness
    self-check) go through ``jacobian``. Needs a model whose eval-mode forward treats samples
    independently."""


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NtkResult:
    """An empirical NTK with the metadata needed to interpret and store it.

    ``kernel`` is float64 numpy, shaped per ``kind`` (module docstring). ``peak_memory_bytes`` is
    the planner's estimate of the probe's peak working set (kernel included), not a measurement.
    """

    kernel: np.ndarray
    kind: str
    method: str
    n1: int
    n2: int
    n_outputs: int
    n_params: int
    dtype: str
    wall_time_s: float
    peak_memory_bytes: int
    symmetric: bool
    n_blocks: int
    schedule: str = ""
    bn_mode: str = "eval"
    est_gflop: float = 0.0
    param_filter: str | None = None
    notes: tuple[str, ...] = ()

    def full_axes(self) -> np.ndarray:
        """The ``full`` kernel as a (N1, O, N2, O) view."""
        if self.kind != NtkKind.FULL.value:
            raise UserError(f"full_axes() needs kind='full', this kernel is {self.kind!r}")
        return self.kernel.reshape(self.n1, self.n_outputs, self.n2, self.n_outputs)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the store's ``.npz``."""
        return {"kernel": self.kernel}

    def summary(self) -> dict[str, Any]:
        """JSON-able metadata (everything but the kernel) plus the kernel's trace and norm."""
        k = self.kernel
        square = k.shape[-1] == k.shape[-2]
        return {
            "probe": "ntk", "kind": self.kind, "method": self.method, "n1": self.n1, "n2": self.n2,
            "n_outputs": self.n_outputs, "n_params": self.n_params, "dtype": self.dtype,
            "wall_time_s": self.wall_time_s, "peak_memory_bytes": self.peak_memory_bytes,
            "symmetric": self.symmetric, "n_blocks": self.n_blocks, "schedule": self.schedule,
            "bn_mode": self.bn_mode,
            "est_gflop": self.est_gflop, "param_filter": self.param_filter, "notes": list(self.notes),
            "kernel_shape": list(k.shape), "kernel_fro": _fro(k),
            "kernel_trace": float(np.trace(k, axis1=-2, axis2=-1).sum()) if square else None,
        }

    @classmethod
    def from_store(cls, arrays: dict[str, np.ndarray], summary: dict[str, Any]) -> "NtkResult":
        """Rebuild from :meth:`to_arrays` / :meth:`summary` output."""
        names = {f for f in cls.__dataclass_fields__} - {"kernel", "notes"}
        kw = {k: summary[k] for k in names if k in summary}
        return cls(kernel=np.asarray(arrays["kernel"], dtype=np.float64),
                   notes=tuple(summary.get("notes", ())), **kw)


@dataclass(frozen=True, eq=False)
class SpectrumResult:
    """Spectrum summaries of a symmetric PSD kernel (see :func:`ntk_spectrum`)."""

    eigenvalues: np.ndarray
    condition_number: float
    effective_rank: float
    participation_ratio: float
    alignment: float | None
    floor: float
    n_below_floor: int
    trace: float
    notes: tuple[str, ...] = ()

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"eigenvalues": self.eigenvalues}

    def summary(self) -> dict[str, Any]:
        ev = self.eigenvalues
        return {"condition_number": self.condition_number, "effective_rank": self.effective_rank,
                "participation_ratio": self.participation_ratio, "alignment": self.alignment,
                "floor": self.floor, "n_below_floor": self.n_below_floor, "trace": self.trace,
                "lambda_max": float(ev[0]) if ev.size else None,
                "lambda_min": float(ev[-1]) if ev.size else None, "notes": list(self.notes)}

    @classmethod
    def from_store(cls, arrays: dict[str, np.ndarray], summary: dict[str, Any]) -> "SpectrumResult":
        names = ("condition_number", "effective_rank", "participation_ratio", "alignment", "floor",
                 "n_below_floor", "trace")
        return cls(eigenvalues=np.asarray(arrays["eigenvalues"], dtype=np.float64),
                   notes=tuple(summary.get("notes", ())), **{k: summary[k] for k in names})


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Top-k eigenpairs of an NTK found matrix-free (see :func:`ntk_topk_lanczos`).

    ``eigenvalues`` (k,) float64 descending; ``eigenvectors`` (N, k) or (N*O, k) sample-major, or
    None; ``residuals`` the Ritz residual norms ||K y - theta y|| (the eigenvalue error is at most
    this, and ~residual^2/gap for well separated eigenvalues).
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    residuals: np.ndarray
    n_matvecs: int
    converged: bool
    kind: str
    n: int
    n_outputs: int
    n_params: int
    dtype: str
    wall_time_s: float
    peak_memory_bytes: int
    block_vectors: int
    subspace_dim: int
    method: str = "ntvp"
    n_passes: int = 0
    notes: tuple[str, ...] = ()

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"eigenvalues": self.eigenvalues, "residuals": self.residuals}
        if self.eigenvectors is not None:
            out["eigenvectors"] = self.eigenvectors
        return out

    def summary(self) -> dict[str, Any]:
        return {"probe": "ntk_lanczos", "kind": self.kind, "n": self.n, "n_outputs": self.n_outputs,
                "n_params": self.n_params, "dtype": self.dtype, "k": int(self.eigenvalues.size),
                "n_matvecs": self.n_matvecs, "converged": self.converged,
                "wall_time_s": self.wall_time_s, "peak_memory_bytes": self.peak_memory_bytes,
                "block_vectors": self.block_vectors, "subspace_dim": self.subspace_dim,
                "method": self.method, "n_passes": self.n_passes, "notes": list(self.notes)}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

# Cost-model constants (multiples of one sample's forward FLOPs [FP]):
_BWD_FP = 2.0        # a backward pass: input gradients + weight gradients
_JVP_FP = 2.5        # a forward-mode pass: primal + tangent
_VMAP_OVERHEAD = 1.5  # per-sample (vmapped) kernels vs one batched kernel, measured on CPU convs
_LANCZOS_MAX_BLOCK = 512  # samples per block in the matrix-free operator (throughput, not memory)
_GRAM_MAX_CHUNK = 32      # samples whose generic layer rows are formed at once (gram operator)
_GRAM_BLOCK = 20          # default vectors per block of the gram operator
_GRAM_ROW_BYTES = 6 << 20  # a block of weight rows formed at once (~6 MB: stays in the L3 cache)


def _fro(a: np.ndarray) -> float:
    """Frobenius norm without overflow for entries beyond 1e154."""
    m = float(np.abs(a).max()) if a.size else 0.0
    return m * float(np.linalg.norm(a / m)) if m > 0 and np.isfinite(m) else m


def _enum(cls, value, what: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise UserError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ranges(n: int, b: int) -> list[tuple[int, int]]:
    b = max(1, int(b))
    return [(i, min(n, i + b)) for i in range(0, n, b)]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


def _couples_samples(model: nn.Module) -> bool:
    """True when the eval-mode forward mixes samples (BatchNorm without running statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
               for m in model.modules())


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Structured layers (for the layerwise method)
# --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """A Linear / Conv2d / BatchNorm module whose per-sample Jacobian has closed form."""

    name: str
    module: nn.Module
    kind: str                      # "linear" | "conv" | "bn"
    w: str | None                  # selected parameter name of the weight (None: not selected)
    b: str | None                  # selected parameter name of the bias
    calls: int = 0                 # calls per forward pass (from the measuring pass)
    t: int = 1                     # positions (Linear: middle dims; Conv: output pixels)
    d_in: int = 0                  # per-position input features (Conv: C_in/groups * kh * kw)
    d_out: int = 0                 # per-position output features
    in_numel: int = 0              # per sample, all calls
    out_numel: int = 0
    unfold_numel: int = 0          # per sample, largest call (Conv only)
    p: int = 0                     # selected parameter elements
    inplace_out: bool = False      # the output is modified in place later (e.g. ReLU(inplace=True))
    gram: bool = False             # contract through the Gram identity (decided by the planner)

    @property
    def names(self) -> list[str]:
        return [n for n in (self.w, self.b) if n is not None]


def _find_layers(fm: FunctionalModel) -> list[_Layer]:
    model = fm.model
    canonical = {id(p): n for n, p in model.named_parameters()}
    owners: dict[int, int] = defaultdict(int)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] += 1
    layers = []
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
            kind = "conv"
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            kind = "bn"
        else:
            continue

        def sel(attr):
            p = getattr(m, attr, None)
            if not isinstance(p, nn.Parameter) or owners[id(p)] != 1:
                return None
            name = canonical.get(id(p))
            return name if name in fm.params else None

        w, b = sel("weight"), sel("bias")
        # a weight that is shared, frozen or unselected while the bias is selected is fine; a
        # shared parameter goes to the generic path.
        if any(isinstance(getattr(m, a, None), nn.Parameter) and owners[id(getattr(m, a))] != 1
               for a in ("weight", "bias")):
            continue
        if w is None and b is None:
            continue
        layers.append(_Layer(name=mname, module=m, kind=kind, w=w, b=b))
    return layers


def _conv_patches(m: nn.Conv2d, a: Tensor) -> Tensor:
    """Patches of the conv input, (n, C_in*kh*kw, D), channel-major like ``weight.reshape(C_out, -1)``.

    A strided view of the padded input copied once (``F.unfold`` is several times slower on CPU).
    """
    kh, kw = m.kernel_size
    dh, dw = m.dilation
    sh, sw = m.stride
    pads = _conv_pads(m)
    if any(pads):
        a = F.pad(a, pads)
    a = a.contiguous()
    n, c, H, W = a.shape
    ho, wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = a.stride()
    view = a.as_strided((n, c, kh, kw, ho, wo), (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw))
    return view.reshape(n, c * kh * kw, ho * wo)


def _conv_pads(m: nn.Conv2d) -> list[int]:
    """[left, right, top, bottom] zero padding of a Conv2d ("same": the extra pixel right/bottom,
    as torch does)."""
    kh, kw = m.kernel_size
    dh, dw = m.dilation
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [0, 0, 0, 0]
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    ph, pw = m.padding
    return [pw, pw, ph, ph]


def _conv_weight_rows(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients (n, C_out * C_in/G * kh * kw) of one conv call for one output.

    ``a`` (n, C_in, H, W) input, ``g`` (n, C_out, H', W') output gradient. The batch becomes the
    group axis of one convolution backward (groups = n * G), so no patch matrix is formed; for
    very few input channels per group, the patch matrix and a batched matmul are faster.
    """
    n, G = a.shape[0], m.groups
    cin_g = a.shape[1] // G
    if _conv_rows_by_patches(cin_g, g.shape[2] * g.shape[3], 1):
        return _conv_weight_rows_all(m, a, g.unsqueeze(0))[:, 0]
    pads = _conv_pads(m)
    if pads[0] != pads[1] or pads[2] != pads[3]:
        a, pad = F.pad(a, pads), [0, 0]
    else:
        pad = [pads[2], pads[0]]
    a = a.contiguous()
    weight = torch.empty((n * g.shape[1], cin_g) + tuple(m.kernel_size), dtype=a.dtype, device=a.device)
    jw = torch.ops.aten.convolution_backward(
        g.reshape((1, -1) + g.shape[2:]), a.reshape((1, -1) + a.shape[2:]), weight, None,
        list(m.stride), pad, list(m.dilation), False, [0, 0], n * G, [False, True, False])[1]
    return jw.reshape(n, -1)


def _conv_rows_by_patches(cin_g: int, t: int, oc: int) -> bool:
    """Per-sample conv weight gradients through the patch matrix and one batched matmul for all
    ``oc`` outputs (rather than a batch-as-groups convolution backward per output): faster on CPU
    for few input channels per group, few output positions ``t`` or several outputs at once
    (measured 2-3x at 8x8 inputs with 10 outputs), and for one output at many positions slower."""
    return cin_g < 8 or t <= 16 or oc >= 4


def _conv_weight_rows_all(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients (n, oc, C_out * C_in/G * kh * kw) of one conv call for ``oc``
    outputs at once: ``a`` (n, C_in, H, W) input, ``g`` (oc, n, C_out, H', W') output gradients.

    sum over positions of g (x) patch: one batched matmul (n, G, oc*C_out/G, T) @ (n, G, T, dk)."""
    oc, n, C = g.shape[:3]
    G = m.groups
    U = _conv_patches(m, a)                                              # (n, C_in*k*k, T)
    T = U.shape[-1]
    Ug = U.reshape(n, G, -1, T).transpose(-1, -2)                        # (n, G, T, dk)
    gg = g.reshape(oc, n, G, C // G, T).permute(1, 2, 0, 3, 4).reshape(n, G, oc * (C // G), T)
    jw = torch.matmul(gg, Ug).reshape(n, G, oc, C // G, -1)              # (n, G, oc, C/G, dk)
    if G > 1:
        jw = jw.transpose(1, 2)
    return jw.reshape(n, oc, -1)


def _lw_parts(layer: _Layer, rec: "_Rec", g: Tensor) -> list[tuple[str, Tensor]]:
    """Per-sample Jacobian rows of one call for a chunk of outputs: [(param name, (n, oc, numel))].

    ``rec`` holds the call's input; ``g``: output gradients (oc, n, ...), one per output in the
    chunk.
    """
    m, oc = layer.module, g.shape[0]
    a = rec.src.detach()
    n = a.shape[0]
    out = []
    if layer.kind == "linear":
        a3 = a.reshape(n, -1, a.shape[-1])                              # (n, T, d_in)
        g4 = g.reshape(oc, n, -1, g.shape[-1])                          # (oc, n, T, d_out)
        if layer.w:
            gt = g4.permute(1, 0, 3, 2).reshape(n, oc * g4.shape[-1], -1)   # (n, oc*d_out, T)
            out.append((layer.w, torch.bmm(gt, a3).reshape(n, oc, -1)))
        if layer.b:
            out.append((layer.b, g4.sum(2).transpose(0, 1)))
    elif layer.kind == "conv":
        if layer.w:
            if _conv_rows_by_patches(a.shape[1] // m.groups, g.shape[-2] * g.shape[-1], oc):
                jw = _conv_weight_rows_all(m, a, g)                                    # (n, oc, p)
            else:
                jw = torch.stack([_conv_weight_rows(m, a, g[o]) for o in range(oc)], 1)
            out.append((layer.w, jw))
        if layer.b:
            out.append((layer.b, g.reshape(oc, n, g.shape[2], -1).sum(-1).transpose(0, 1)))
    else:  # bn: d/dw = sum_pos g * x_hat = inv * (sum_pos g * a - mean * sum_pos g), d/db = sum_pos g
        mean, var, eps = rec.norm
        g4 = g.reshape(oc, n, g.shape[2], -1)                           # (oc, n, C, positions)
        gsum = g4.sum(-1)                                               # (oc, n, C)
        if layer.w:
            ga = (g4 * a.reshape(1, n, a.shape[1], -1)).sum(-1)
            out.append((layer.w, ((ga - mean * gsum) * torch.rsqrt(var + eps)).transpose(0, 1)))
        if layer.b:
            out.append((layer.b, gsum.transpose(0, 1)))
    return out


def _lw_rows(layer: _Layer, rec: "_Rec", g: Tensor) -> Tensor:
    """(n, oc, P_layer) per-sample Jacobian rows of one call for a chunk of outputs."""
    parts = _lw_parts(layer, rec, g)
    return parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts], dim=2)


def _gram_feats(layer: _Layer, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(A, G): (n, T, k) input features (a constant 1 for the bias) and (oc, n, T, d_out) gradients."""
    n, oc = a.shape[0], g.shape[0]
    if layer.kind == "linear":
        A = a.reshape(n, -1, a.shape[-1])
        G = g.reshape(oc, n, -1, g.shape[-1])
    else:
        A = _conv_patches(layer.module, a).transpose(1, 2)              # (n, D, C_in*k*k)
        G = g.reshape(oc, n, g.shape[2], -1).transpose(2, 3)            # (oc, n, D, C_out)
    if layer.b is not None:
        ones = torch.ones(A.shape[:2] + (1,), dtype=A.dtype, device=A.device)
        A = torch.cat([A, ones], dim=2) if layer.w is not None else ones
    return A, G


@dataclass
class _Rec:
    layer: int
    src: Tensor        # module input (a node of the graph; kept alive by it anyway)
    z: Tensor          # module output, a node of the graph
    version: int       # src._version at call time, to detect later in-place writes
    norm: tuple | None = None   # BatchNorm: (running_mean, running_var, eps) used by the call


@dataclass
class _LwCtx:
    y: Tensor                    # (n, O)
    recs: list[_Rec]
    n: int
    by_layer: dict[int, list[int]] = field(default_factory=dict)


def _lw_forward(fm: FunctionalModel, params: dict[str, Tensor], x: Tensor,
                layers: Sequence[_Layer]) -> _LwCtx:
    """Batched forward pass recording (input, output) of every structured layer."""
    recs: list[_Rec] = []

    def hook_for(li: int, layer: _Layer):
        def hook(mod, inputs, out):
            a = inputs[0]
            norm = (mod.running_mean, mod.running_var, mod.eps) if layer.kind == "bn" else None
            recs.append(_Rec(li, a, out, a._version, norm))
            # a later in-place op (ReLU(inplace=True)) must not rewrite the recorded output's
            # history: hand a copy downstream
            return out.clone() if layer.inplace_out else None
        return hook

    handles = [layer.module.register_forward_hook(hook_for(i, layer)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            y = fm(params, x)
    finally:
        for h in handles:
            h.remove()
    ctx = _LwCtx(y=y.reshape(x.shape[0], -1), recs=recs, n=x.shape[0])
    for k, r in enumerate(recs):
        ctx.by_layer.setdefault(r.layer, []).append(k)
    return ctx


def _lw_grads(ctx: _LwCtx, o0: int, o1: int) -> list[Tensor]:
    """d f_o / d z for o in [o0, o1) and every recorded layer output z: (oc, n, ...) each.

    One backward pass of sum_i f_o(x_i) per output (per sample that is d f_o(x_i)/d z_i since
    samples are independent). A plain loop: vmapping the cotangents (``is_grads_batched``) hits
    slow batching rules of the convolution backward on CPU.
    """
    zs = [r.z for r in ctx.recs]
    out = [torch.zeros((o1 - o0,) + z.shape, dtype=z.dtype, device=z.device) for z in zs]
    for i, o in enumerate(range(o0, o1)):
        gs = torch.autograd.grad(ctx.y[:, o].sum(), zs, retain_graph=True, allow_unused=True)
        for buf, g in zip(out, gs):
            if g is not None:
                buf[i] = g
    return out


def _lw_backward(ctx: _LwCtx, leaf: Tensor | None, outputs: Sequence[int],
                 on_grad: Callable[[int, int, Tensor], None]) -> None:
    """For each output o, one backward pass of sum_i f_o(x_i); ``on_grad(o, k, g)`` receives the
    gradient (n, ...) at the output of record k as soon as autograd computes it, so that no more
    than one layer's gradient is alive at a time. The pass runs down to the input ``leaf`` (which
    every layer output depends on); without one (integer inputs) it targets the layer outputs."""
    state = {"o": 0}
    zs = [r.z for r in ctx.recs]
    handles = [z.register_hook(lambda g, k=k: on_grad(state["o"], k, g)) for k, z in enumerate(zs)]
    try:
        for o in outputs:
            state["o"] = o
            torch.autograd.grad(ctx.y[:, o].sum(), [leaf] if leaf is not None else zs,
                                retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# The measuring pass: outputs, saved activations, FLOPs, layer shapes
# --------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    n_outputs: int
    saved_numel: int      # activations saved for backward, per sample (elements)
    flops: float          # forward FLOPs per sample


def _measure(fm: FunctionalModel, x0: Tensor, layers: Sequence[_Layer]) -> _Stats:
    """One forward pass of one sample with the graph recorded: O, saved activations, FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
    known = set()
    for t in [*fm.params.values(), *fm.fixed.values(), *fm.buffers.values()]:
        known.add(t.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        try:
            if t.untyped_storage().data_ptr() not in known:
                key = t.data_ptr()
                seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    shapes: dict[int, list] = defaultdict(list)
    versions: dict[int, list] = defaultdict(list)

    def hook_for(li):
        def hook(mod, inputs, out):
            shapes[li].append((tuple(inputs[0].shape), tuple(out.shape)))
            versions[li].append((out, out._version))
        return hook

    handles = [layer.module.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                FlopCounterMode(display=False) as fc:
            y = fm(params, x0)
    finally:
        for h in handles:
            h.remove()
    if y.dim() < 1 or y.shape[0] != x0.shape[0]:
        raise UserError(f"model output has shape {tuple(y.shape)}; expected a leading batch axis of "
                        f"size {x0.shape[0]} (outputs (N, ...) for inputs (N, ...))")
    itemsize = torch.empty((), dtype=fm.dtype).element_size()
    for li, layer in enumerate(layers):
        calls = shapes.get(li, [])
        layer.calls = len(calls)
        layer.inplace_out = any(t._version != v for t, v in versions.get(li, []))
        layer.p = sum(fm.params[n].numel() for n in layer.names)
        if not calls:
            continue
        ins, outs = zip(*calls)
        layer.in_numel = sum(math.prod(s[1:]) for s in ins)
        layer.out_numel = sum(math.prod(s[1:]) for s in outs)
        m = layer.module
        if layer.kind == "linear":
            layer.d_in, layer.d_out = m.in_features, m.out_features
            layer.t = max(math.prod(s[1:-1]) for s in outs) if len(outs[0]) > 2 else 1
        elif layer.kind == "conv":
            k = math.prod(m.kernel_size)
            layer.d_in, layer.d_out = m.in_channels // m.groups * k, m.out_channels
            layer.t = max(math.prod(s[2:]) for s in outs)
            layer.unfold_numel = m.in_channels * k * layer.t
        else:
            layer.d_in = layer.d_out = outs[0][1]
            layer.t = max(math.prod(s[2:]) for s in outs) if len(outs[0]) > 2 else 1
    return _Stats(n_outputs=int(y[0].numel()), saved_numel=sum(seen.values()) // itemsize,
                  flops=float(fc.get_total_flops()))


def _check_finite(fm: FunctionalModel, x: Tensor, chunk: int, which: str) -> float:
    """Raise on non-finite model outputs; return the largest |output|."""
    top = 0.0
    with torch.no_grad():
        for lo, hi in _ranges(x.shape[0], chunk):
            y = fm(fm.params, x[lo:hi])
            if not torch.isfinite(y).all():
                bad = (~torch.isfinite(y.reshape(hi - lo, -1))).any(1).nonzero().flatten()
                raise UserError(f"model outputs are not finite on the probe inputs ({which}, e.g. sample "
                                f"{lo + int(bad[0])}); check the checkpoint and the input normalisation")
            if y.numel():
                top = max(top, float(y.abs().max()))
    return top


def _out_of_range(dtype: torch.dtype, y_max: float) -> bool:
    """Whether outputs of size ``y_max`` put the kernel beyond ``dtype``'s range. The kernel
    grows like the squared output times sum_theta (d log f / d theta)^2 (seen: 1e6 y_max^2 for a
    multiplicative ResNet-20), so float32 is given up from outputs of ~1.8e12 on (sqrt of its
    largest value, 1.8e19, times 1e-7)."""
    return y_max > math.sqrt(torch.finfo(dtype).max) * 1e-7


def _promotion_note(dtype: torch.dtype, y_max: float) -> str:
    name = str(dtype).replace("torch.", "")
    return (f"model outputs reach {y_max:.3g}: the kernel would overflow {name}, so it was computed "
            f"in float64 (pass dtype= to choose)")


def _promoted(res, t0: float, dtype: torch.dtype, y_max: float):
    """The float64 re-run's result, timed from the first call and carrying the reason."""
    return dataclasses.replace(res, wall_time_s=time.perf_counter() - t0,
                               notes=(_promotion_note(dtype, y_max), *res.notes))


def _overflow_error(dtype: torch.dtype, y_max: float, what: str) -> UserError:
    name = str(dtype).replace("torch.", "")
    hint = "pass dtype=torch.float64" if dtype != torch.float64 else "rescale the model or its inputs"
    return UserError(f"the {what} overflowed {name} (model outputs reach {y_max:.3g}); {hint}")


# --------------------------------------------------------------------------------------------
# Planning: memory and cost model
# --------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    fm: FunctionalModel
    kind: NtkKind
    x1: Tensor
    x2: Tensor
    sym: bool
    stats: _Stats
    itemsize: int
    budget: int

    @property
    def n1(self) -> int:
        return self.x1.shape[0]

    @property
    def n2(self) -> int:
        return self.x2.shape[0]

    @property
    def O(self) -> int:  # noqa: E743 -- the paper's symbol
        return self.stats.n_outputs

    @property
    def q(self) -> int:
        """Output pairs per sample pair the kernel keeps: O^2 (full), O (diagonal), 1 (trace)."""
        return {NtkKind.FULL: self.O ** 2, NtkKind.DIAGONAL: self.O, NtkKind.TRACE: 1}[self.kind]

    @property
    def kernel_bytes(self) -> int:
        return self.n1 * self.n2 * self.q * 8

    @property
    def fp(self) -> float:
        return max(self.stats.flops, 2.0 * self.fm.n_params)


@dataclass
class _Plan:
    method: NtkMethod
    feasible: bool
    reason: str = ""
    block: int = 1
    chunk: int = 1
    groups: list[list[str]] | None = None
    peak_bytes: int = 0
    min_bytes: int = 0            # smallest budget this method could work with
    flops: float = 0.0
    cost: float = math.inf
    n_blocks: int = 0
    schedule: str = ""
    layers: list[_Layer] = field(default_factory=list)
    fallback: "_Plan | None" = None


def _pair_count(n1: int, n2: int, b: int, sym: bool) -> tuple[int, float]:
    """(block pairs, sample Jacobian evaluations) of the row-block x column-block schedule."""
    r, c = len(_ranges(n1, b)), len(_ranges(n2, b))
    if b >= max(n1, n2):
        return 1, float(n1 + (0 if sym else n2))
    if sym:
        return r * (r + 1) // 2, n1 + n1 * (r - 1) / 2.0
    return r * c, float(n1 + r * n2)


def _plan_jacobian(c: _Ctx, names: Sequence[str], free: int, block_size: int | None) -> _Plan:
    it, O, S = c.itemsize, c.O, c.stats.saved_numel
    sizes = {n: c.fm.params[n].numel() for n in names}
    P = sum(sizes.values())
    s_j = O * P * it                           # one sample's Jacobian
    s_t = (1 + O) * S * it                      # one sample's jacrev working set (forward + O grads)
    n_feat = c.n1 + (0 if c.sym else c.n2)
    nmax = max(c.n1, c.n2)
    per_eval = (1 + _BWD_FP * O) * c.fp * _VMAP_OVERHEAD
    contraction = 2.0 * c.n1 * c.n2 * c.q * P
    plan = _Plan(NtkMethod.JACOBIAN, False, min_bytes=3 * O * max(sizes.values()) * it + s_t)

    def finish(block, chunk, groups, peak):
        pairs, evals = _pair_count(c.n1, c.n2, block, c.sym)
        g = 1 if groups is None else len(groups)
        frac = 1.0 if (block >= nmax or not c.sym) else (len(_ranges(c.n1, block)) + 1) / (
            2.0 * len(_ranges(c.n1, block)))
        if groups:
            sched = f"blocks of {block} sample(s) x {g} parameter groups"
        elif block >= nmax:
            sched = f"resident (Jacobians of all samples, chunks of {chunk})"
        else:
            sched = f"blocks of {block} samples"
        plan.__dict__.update(feasible=True, block=block, chunk=chunk, groups=groups, peak_bytes=peak,
                             n_blocks=pairs * g, schedule=sched)
        plan.flops = evals * g * (1 + _BWD_FP * O) * c.fp + contraction * frac
        plan.cost = evals * g * per_eval + contraction * frac
        return plan

    if block_size:
        b = int(block_size)
        peak = 2 * b * s_j + b * (s_t + s_j)
        if peak > free:
            plan.reason = (f"block_size={b} needs {_mib(peak)} for Jacobians but only {_mib(free)} is "
                           f"left in the budget")
            return plan
        return finish(min(b, nmax), b, None, peak)
    # every Jacobian resident, computed in chunks
    chunk = (free - n_feat * s_j) // (s_t + s_j) if free > n_feat * s_j else 0
    if chunk >= 1:
        chunk = min(chunk, nmax)
        return finish(nmax, chunk, None, n_feat * s_j + chunk * (s_t + s_j))
    # row block x column block, Jacobians of both blocks held
    b = free // (3 * s_j + s_t)
    if b >= 1:
        return finish(b, b, None, b * (3 * s_j + s_t))
    # one sample at a time, parameters in groups
    cap = (free - s_t) // (3 * O * it) if free > s_t else 0
    if cap < max(sizes.values()):
        plan.reason = (f"one sample's Jacobian working set needs at least {_mib(plan.min_bytes)} "
                       f"(largest parameter tensor x {O} outputs, plus activations)")
        return plan
    groups, cur, cur_n = [], [], 0
    for n, s in sizes.items():
        if cur and cur_n + s > cap:
            groups.append(cur)
            cur, cur_n = [], 0
        cur.append(n)
        cur_n += s
    groups.append(cur)
    return finish(1, 1, groups, 3 * O * max(sum(sizes[n] for n in g) for g in groups) * it + s_t)


def _plan_ntvp(c: _Ctx, free: int, block_size: int | None) -> _Plan:
    it, O, S, P = c.itemsize, c.O, c.stats.saved_numel, c.fm.n_params
    col = (P + 2 * S) * it                      # one column's parameter tangent + its VJP
    cell = (2 * S + O) * it                     # one (column, row sample) JVP working set
    plan = _Plan(NtkMethod.NTVP, False, min_bytes=col + cell)
    ncols = c.n2 * O
    rows = min(c.n1, int(block_size) if block_size else c.n1)
    # columns per chunk: a quarter of the budget for tangents, then rows fill the rest
    cols = max(1, min(ncols, free // (4 * col)))
    while cols > 1 and cols * (col + cell) > free:
        cols //= 2
    if not block_size:
        rows = int(min(c.n1, max(1, (free - cols * col) // (cols * cell))))
    peak = cols * (col + rows * cell)
    if peak > free:
        plan.reason = (f"one kernel column needs {_mib(col + rows * cell)} (P-vector plus "
                       f"activations of {rows} row sample(s))")
        return plan
    plan.__dict__.update(feasible=True, block=rows, chunk=cols, peak_bytes=peak,
                         n_blocks=len(_ranges(ncols, cols)) * len(_ranges(c.n1, rows)),
                         schedule=f"{cols} columns x {rows} rows at once")
    plan.flops = ncols * (3.0 + _JVP_FP * c.n1) * c.fp
    plan.cost = plan.flops * _VMAP_OVERHEAD
    return plan


def _layer_use_gram(layer: _Layer, kind: NtkKind, O: int) -> bool:
    if layer.kind == "bn" or layer.calls != 1 or layer.w is None:
        return False
    if layer.kind == "conv" and layer.module.groups != 1:
        return False
    t, k, d = layer.t, layer.d_in + (1 if layer.b else 0), layer.d_out
    if kind == NtkKind.FULL:
        return t == 1
    # per sample pair: Gram t^2*(k/O + d + 1) against the Jacobian contraction k*d
    return t == 1 or t * t * (k / O + d + 1) < 0.5 * k * d


def _plan_layerwise(c: _Ctx, layers: list[_Layer], fallback: list[str], free: int,
                    block_size: int | None) -> _Plan:
    """Memory and cost of the layerwise method (see :class:`NtkMethod`).

    trace / diagonal: per block pair one forward pass over both blocks (graph + layer outputs
    kept), then per output a backward pass contracting one layer at a time; per sample
    ~ (2 A + layer outputs + largest layer Jacobian row + largest patch matrix).
    full: each block keeps the gradients of all O outputs at every layer output.
    """
    it, O, S = c.itemsize, c.O, c.stats.saved_numel
    full = c.kind == NtkKind.FULL
    plan = _Plan(NtkMethod.LAYERWISE, False)
    if not layers:
        plan.reason = "no Linear/Conv2d/BatchNorm parameter is selected"
        return plan
    for layer in layers:
        layer.gram = _layer_use_gram(layer, c.kind, O)
    sum_out = sum(layer.out_numel for layer in layers)
    p_mat = max([layer.p for layer in layers if not layer.gram] + [0])
    unf = max([layer.unfold_numel for layer in layers] + [0])
    m = O if full else 1                                          # outputs alive at once
    clones = sum(layer.out_numel for layer in layers if layer.inplace_out)
    held_grads = O * sum_out if full else 0                       # full: every output's gradients
    per_sample = (2 * S + clones + O + held_grads + m * p_mat + unf) * it

    nmax = max(c.n1, c.n2)

    def peak(b: int) -> int:
        # samples in one forward pass: both blocks of a pair (one block: x1 with itself)
        n = b if (c.sym and b >= nmax) else 2 * b
        gram = sum(2 * n * n * layer.t ** 2 * it for layer in layers if layer.gram)
        return n * per_sample + gram

    if block_size:
        b = min(int(block_size), nmax)
    elif peak(nmax) <= free:
        b = nmax
    else:                                 # peak is increasing in b: bisect the largest that fits
        lo, hi = 0, nmax
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= free else (lo, mid)
        b = lo
    plan.min_bytes = peak(1)
    if b < 1 or peak(b) > free:
        plan.reason = f"one sample's layerwise working set needs {_mib(peak(max(b, 1)))}"
        return plan
    pairs, evals = _pair_count(c.n1, c.n2, b, c.sym)
    rows, cols = len(_ranges(c.n1, b)), len(_ranges(c.n2, b))
    if b >= nmax:
        pass_samples = c.n1 + (0 if c.sym else c.n2)
    else:                                 # backward (and, but for "full", forward) per block pair
        pass_samples = (c.n1 * cols + c.n2 * rows) / (2.0 if c.sym else 1.0)
    fwd = (evals if full else pass_samples) * c.fp
    flops = fwd + pass_samples * O * _BWD_FP * c.fp
    frac = 1.0 if (b >= nmax or not c.sym) else (rows + 1) / (2.0 * rows)
    for layer in layers:
        if layer.gram:
            k = layer.d_in + (1 if layer.b else 0)
            flops += 2.0 * c.n1 * c.n2 * layer.t ** 2 * (k + O * (layer.d_out + 1)) * frac
        else:
            flops += 2.0 * c.n1 * c.n2 * c.q * layer.p * frac
    n_gram = sum(layer.gram for layer in layers)
    plan.__dict__.update(feasible=True, block=b, chunk=m, peak_bytes=peak(b), n_blocks=pairs,
                         layers=layers, flops=flops, cost=flops,
                         schedule=(("one block" if b >= nmax else f"blocks of {b} samples")
                                   + f", {len(layers)} structured layers ({n_gram} by Gram)"))
    if fallback:
        fb = _plan_jacobian(c, fallback, free, None)
        if not fb.feasible:
            plan.feasible = False
            plan.reason = f"parameters outside structured layers: {fb.reason}"
            return plan
        plan.fallback = fb
        plan.schedule += f"; {len(fallback)} other parameter tensors: {fb.schedule}"
        plan.flops += fb.flops
        plan.cost += fb.cost
        plan.peak_bytes = max(plan.peak_bytes, fb.peak_bytes)
    return plan


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


def _block_shape(kind: NtkKind, b1: int, b2: int, O: int) -> tuple[int, ...]:
    return {NtkKind.TRACE: (b1, b2), NtkKind.DIAGONAL: (O, b1, b2),
            NtkKind.FULL: (b1, O, b2, O)}[kind]


def _put(K: Tensor, kind: NtkKind, blk: Tensor, r: tuple[int, int], s: tuple[int, int],
         transpose: bool = False) -> None:
    """K[rows r, cols s] += blk (or, transposed, K[cols s, rows r] += blk^T)."""
    if transpose:
        r, s = s, r
        blk = {NtkKind.TRACE: lambda t: t.T, NtkKind.DIAGONAL: lambda t: t.transpose(1, 2),
               NtkKind.FULL: lambda t: t.permute(2, 3, 0, 1)}[kind](blk)
    if kind == NtkKind.TRACE:
        K[r[0]:r[1], s[0]:s[1]] += blk
    elif kind == NtkKind.DIAGONAL:
        K[:, r[0]:r[1], s[0]:s[1]] += blk
    else:
        K[r[0]:r[1], :, s[0]:s[1], :] += blk


def _schedule(c: _Ctx, K: Tensor, block: int, feats: Callable[[Tensor], Any],
              contract: Callable[[Any, Any], Tensor], pbar) -> None:
    """Row block x column block loop; with x2 = x1 only blocks j >= i are computed and mirrored."""
    rows = _ranges(c.n1, block)
    cols = rows if c.sym else _ranges(c.n2, block)
    for bi, r in enumerate(rows):
        f1 = feats(c.x1[r[0]:r[1]])
        for bj, s in enumerate(cols):
            if c.sym and bj < bi:
                continue
            f2 = f1 if (c.sym and bj == bi) else feats(c.x2[s[0]:s[1]])
            blk = contract(f1, f2)
            _put(K, c.kind, blk, r, s)
            if c.sym and bj > bi:
                _put(K, c.kind, blk, r, s, transpose=True)
            del f2, blk
            pbar.update(1)
        del f1


def _run_jacobian(c: _Ctx, plan: _Plan, names: Sequence[str], K: Tensor, pbar) -> None:
    fm, O = c.fm, c.O
    for group in plan.groups or [list(names)]:
        sub = {n: fm.params[n] for n in group}
        rest = {n: p for n, p in fm.params.items() if n not in sub}

        def f(ps, xi):
            return fm.single({**rest, **ps}, xi)

        jac = vmap(jacrev(f), in_dims=(None, 0))

        def feats(x):
            n = x.shape[0]
            if n <= plan.chunk:
                return {k: v.reshape(n, O, -1) for k, v in jac(sub, x).items()}      # (n, O, p)
            out = {k: torch.empty((n, O, p.numel()), dtype=p.dtype, device=p.device)
                   for k, p in sub.items()}
            for lo, hi in _ranges(n, plan.chunk):
                for k, v in jac(sub, x[lo:hi]).items():
                    out[k][lo:hi] = v.reshape(hi - lo, O, -1)
            return out

        def contract(f1, f2):
            n1, n2 = next(iter(f1.values())).shape[0], next(iter(f2.values())).shape[0]
            blk = torch.zeros(_block_shape(c.kind, n1, n2, O), dtype=torch.float64, device=K.device)
            for k in f1:
                j1, j2 = f1[k], f2[k]                                                # (n, O, p)
                if c.kind == NtkKind.TRACE:
                    blk += (j1.reshape(n1, -1) @ j2.reshape(n2, -1).T).to(torch.float64)
                elif c.kind == NtkKind.DIAGONAL:
                    blk += torch.bmm(j1.transpose(0, 1), j2.permute(1, 2, 0)).to(torch.float64)
                else:
                    blk += (j1.reshape(n1 * O, -1) @ j2.reshape(n2 * O, -1).T).view(
                        n1, O, n2, O).to(torch.float64)
            return blk

        _schedule(c, K, plan.block, feats, contract, pbar)


def _input_leaf(x: Tensor) -> Tensor | None:
    return x.detach().requires_grad_() if x.is_floating_point() else None


def _run_layerwise(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    if c.kind == NtkKind.FULL:
        _run_layerwise_full(c, plan, K, pbar)
    else:
        _run_layerwise_stream(c, plan, K, pbar)


def _run_layerwise_stream(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """Trace / diagonal kernels: per block pair one forward pass over both blocks, then per output
    one backward pass during which every layer's contribution is contracted as its gradient
    arrives (hooks on the layer outputs): memory ~ the forward graph + one layer at a time."""
    fm, layers = c.fm, plan.layers
    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
    rows = _ranges(c.n1, plan.block)
    cols = rows if c.sym else _ranges(c.n2, plan.block)
    for bi, r in enumerate(rows):
        for bj, s in enumerate(cols):
            if c.sym and bj < bi:
                continue
            same = c.sym and bi == bj
            xa = c.x1[r[0]:r[1]]
            x = xa if same else torch.cat([xa, c.x2[s[0]:s[1]]])
            n1, n2 = r[1] - r[0], s[1] - s[0]
            blk = _lw_stream_pair(c, layers, params, x, n1, n2, same)
            _put(K, c.kind, blk, r, s)
            if c.sym and bj > bi:
                _put(K, c.kind, blk, r, s, transpose=True)
            pbar.update(1)


def _lw_stream_pair(c: _Ctx, layers: list[_Layer], params: dict[str, Tensor], x: Tensor, n1: int,
                    n2: int, same: bool) -> Tensor:
    """Kernel block between x[:n1] and x[n1:] (or x and itself when ``same``)."""
    O = c.O
    leaf = _input_leaf(x)
    ctx = _lw_forward(c.fm, params, leaf if leaf is not None else x, layers)
    blk = torch.zeros(_block_shape(c.kind, n1, n2, O), dtype=torch.float64, device=x.device)
    pending: dict[int, tuple[Tensor, int]] = {}
    aa_cache: dict[int, Tensor] = {}

    def on_grad(o: int, k: int, g: Tensor) -> None:
        rec = ctx.recs[k]
        li = rec.layer
        layer = layers[li]
        if layer.gram:                      # sum_ts (a1_t . a2_s)(g1_t . g2_s), J never formed
            A, G = _gram_feats(layer, rec.src.detach(), g.unsqueeze(0))          # (N, T, k), (1, N, T, d)
            G = G[0]
            T = A.shape[1]
            A1, G1 = A[:n1].reshape(n1 * T, -1), G[:n1].reshape(n1 * T, -1)
            A2, G2 = (A1, G1) if same else (A[n1:].reshape(n2 * T, -1), G[n1:].reshape(n2 * T, -1))
            if li not in aa_cache:
                aa_cache[li] = (A1 @ A2.T).view(n1, T, n2, T)
            val = (aa_cache[li] * (G1 @ G2.T).view(n1, T, n2, T)).sum((1, 3))
        else:
            J = _lw_rows(layer, rec, g.unsqueeze(0))[:, 0]          # (N, P_layer)
            if layer.calls > 1:                  # a module called several times: sum its calls
                prev, seen = pending.pop(li, (None, 0))
                J = J if prev is None else prev + J
                if seen + 1 < layer.calls:
                    pending[li] = (J, seen + 1)
                    return
            J1 = J[:n1]
            val = J1 @ (J1 if same else J[n1:]).T                      # (n1, n2)
        if c.kind == NtkKind.TRACE:
            blk.add_(val.to(torch.float64))
        else:
            blk[o].add_(val.to(torch.float64))

    _lw_backward(ctx, leaf, range(O), on_grad)
    return blk


def _run_layerwise_full(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """Full kernel: the output pairs (o, o') of a layer need the gradients of all O outputs at once,
    so each block keeps them (O x the layer outputs) and contracts layer by layer."""
    fm, O, layers = c.fm, c.O, plan.layers
    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}

    def feats(x):
        return _lw_forward(fm, params, x, layers)

    def layer_rows(ctx, li, grads):                        # (n, O, P_layer), summed over calls
        rows = None
        for k in ctx.by_layer[li]:
            j = _lw_rows(layers[li], ctx.recs[k], grads[k])
            rows = j if rows is None else rows + j
        return rows

    def contract(f1: _LwCtx, f2: _LwCtx):
        same = f1 is f2
        n1, n2 = f1.n, f2.n
        blk = torch.zeros((n1, O, n2, O), dtype=torch.float64, device=K.device)
        g1 = _lw_grads(f1, 0, O)                                                 # (O, n, ...)
        g2 = g1 if same else _lw_grads(f2, 0, O)
        for li in [li for li in range(len(layers)) if li in f1.by_layer and li in f2.by_layer]:
            layer = layers[li]
            if layer.gram:                                   # T == 1: (a1 . a2 + 1)(g1 . g2)
                k1, k2 = f1.by_layer[li][0], f2.by_layer[li][0]
                A1, G1 = _gram_feats(layer, f1.recs[k1].src.detach(), g1[k1])      # (n1, 1, k), (O, n1, 1, d)
                A2, G2 = (A1, G1) if same else _gram_feats(layer, f2.recs[k2].src.detach(), g2[k2])
                aa = A1[:, 0] @ A2[:, 0].T                                         # (n1, n2)
                gg = torch.einsum("oic,pjc->iojp", G1[:, :, 0], G2[:, :, 0])       # (n1,O,n2,O)
                blk += (gg * aa[:, None, :, None]).to(torch.float64)
                continue
            J1 = layer_rows(f1, li, g1)                                            # (n1, O, p)
            J2 = J1 if same else layer_rows(f2, li, g2)
            blk += (J1.reshape(n1 * O, -1) @ J2.reshape(n2 * O, -1).T).view(
                n1, O, n2, O).to(torch.float64)
            del J1, J2
        return blk

    _schedule(c, K, plan.block, feats, contract, pbar)


def _lw_selfcheck(c: _Ctx, layers: list[_Layer]) -> tuple[list[_Layer], list[str]]:
    """Keep the layers whose closed-form per-sample gradients match autograd on two samples.

    Uses the same streaming backward as the kernel, so it catches parameters used outside their
    module's forward, modules overriding forward, inputs written in place after use, modules
    applied to tensors without the batch axis and layer outputs the backward pass never reaches.
    """
    fm, O = c.fm, c.O
    if not layers:
        return [], []
    names = [n for layer in layers for n in layer.names]
    xc = c.x1[:2]
    params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
    leaf = _input_leaf(xc)
    try:
        ctx = _lw_forward(fm, params, leaf if leaf is not None else xc, layers)
    except RuntimeError:
        return [], names
    bad = {r.layer for r in ctx.recs
           if r.src._version != r.version or r.src.shape[0] != ctx.n or r.z.shape[0] != ctx.n}
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(ctx.n, O, generator=gen, dtype=torch.float64).to(device=xc.device, dtype=fm.dtype)
    ref = torch.autograd.grad((ctx.y * w).sum(), [params[n] for n in names], retain_graph=True,
                              allow_unused=True)
    ref = {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, ref)}
    rec_sum = {n: torch.zeros_like(params[n]).reshape(-1) for n in names}

    def on_grad(o: int, k: int, g: Tensor) -> None:
        r = ctx.recs[k]
        if r.layer in bad:
            return
        try:
            for name, rows in _lw_parts(layers[r.layer], r, g.unsqueeze(0)):     # (n, 1, numel)
                rec_sum[name] += (w[:, o, None] * rows[:, 0]).sum(0)
        except RuntimeError:
            bad.add(r.layer)

    _lw_backward(ctx, leaf, range(O), on_grad)
    rtol = 1e-8 if fm.dtype == torch.float64 else 1e-3
    scale = max([float(_norm64(g)) for g in ref.values()] + [1e-30])
    for li, layer in enumerate(layers):
        for n in layer.names:
            err = float(_norm64(rec_sum[n].double() - ref[n].reshape(-1).double()))
            # written so that a non-finite error or reference fails the check
            if not err <= rtol * max(float(_norm64(ref[n])), 1e-6 * scale):
                bad.add(li)
    good = [layer for li, layer in enumerate(layers) if li not in bad]
    return good, [n for li in sorted(bad) for n in layers[li].names]


def _checked_layers(c: _Ctx, layers: list[_Layer]) -> tuple[list[_Layer], list[str], list[str]]:
    """(structured layers that pass the closed-form self-check, parameter names left to the
    generic ``vmap(jacrev)`` path, names that failed the check)."""
    good, bad = _lw_selfcheck(c, [lay for lay in layers if lay.calls > 0])
    covered = {nm for lay in good for nm in lay.names}
    return good, [nm for nm in c.fm.params if nm not in covered], bad


def _run_ntvp(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    fm, O, params = c.fm, c.O, c.fm.params
    n2 = c.n2
    col_j = torch.arange(n2, device=K.device).repeat_interleave(O)
    col_o = torch.arange(O, device=K.device).repeat(n2)
    eye = torch.eye(O, dtype=fm.dtype, device=c.x1.device)

    def vjp_one(xj, e):                      # d f_e(x_j) / d theta as a parameter dict
        _, fn = vjp(lambda p: fm.single(p, xj), params)
        return fn(e)[0]

    tangents = vmap(vjp_one)
    for lo, hi in _ranges(n2 * O, plan.chunk):
        js, os_ = col_j[lo:hi], col_o[lo:hi]
        U = tangents(c.x2[js.to(c.x2.device)], eye[os_.to(eye.device)])               # (c, ...)
        ar = torch.arange(hi - lo, device=K.device)
        for r in _ranges(c.n1, plan.block):
            xb = c.x1[r[0]:r[1]]

            def push(t):
                return jvp(lambda p: fm.batched(p, xb), (params,), (t,))[1]
            JV = vmap(push)(U).to(torch.float64)                                       # (c, b, O)
            if c.kind == NtkKind.FULL:
                K[r[0]:r[1], :, js, os_] = JV.permute(1, 2, 0)
            elif c.kind == NtkKind.TRACE:
                K[r[0]:r[1]].index_add_(1, js, JV[ar, :, os_].T)
            else:
                K[os_, r[0]:r[1], js] = JV[ar, :, os_]
            pbar.update(1)


# --------------------------------------------------------------------------------------------
# Public: the kernel
# --------------------------------------------------------------------------------------------


def _prepare_inputs(fm: FunctionalModel, x1, x2) -> tuple[Tensor, Tensor, bool]:
    x1 = fm.prepare(x1)
    if x1.dim() < 1 or x1.shape[0] < 1:
        raise UserError(f"x1 must have a leading sample axis with at least one sample, got shape "
                        f"{tuple(x1.shape)}")
    if x2 is None:
        return x1, x1, True
    x2 = fm.prepare(x2)
    if x2.dim() != x1.dim() or x2.shape[1:] != x1.shape[1:] or x2.shape[0] < 1:
        raise UserError(f"x2 samples have shape {tuple(x2.shape[1:])} but x1 samples "
                        f"{tuple(x1.shape[1:])}; both must be (N, ...) with the same sample shape")
    return x1, x2, False


def _fit_n(free: int, q: int, n2: int | None) -> int:
    if free <= 0:
        return 0
    if n2 is None:
        return int(math.isqrt(free // (8 * q)))
    return int(free // (8 * q * n2))


def empirical_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None = None, *,
                  kind: NtkKind | str = "trace", method: NtkMethod | str = "auto",
                  memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, block_size: int | None = None,
                  param_filter: ParamFilter = None, dtype: torch.dtype | str | None = None,
                  device: torch.device | str | None = None, progress: bool = False) -> NtkResult:
    """Empirical NTK of ``model`` between ``x1`` (N1, ...) and ``x2`` (N2, ...) (default: x1).

    ``kind`` and the axis conventions: module docstring. ``param_filter`` restricts the kernel to
    a parameter group (the other parameters are held fixed). The model is evaluated in eval mode
    and is not modified.

    Memory and cost model (``method="auto"``): one forward pass of one sample measures the
    activations saved for the backward pass (A, per sample) and the forward FLOPs [FP] (matmul
    and conv FLOPs, ``FlopCounterMode``). Each method gets a plan -- the largest blocks of samples
    whose peak working set (kernel + the Jacobians / activations it holds at once) fits the
    budget -- and an estimated cost, with q = 1 (trace), O (diagonal), O^2 (full):

    * jacobian:  1.5 * E * (1 + 2*O) * [FP] + 2 * N1 * N2 * q * P, where E counts per-sample
      Jacobian evaluations (N when all fit at once, more when column blocks are recomputed);
    * layerwise: S * (1 + 2*O) * [FP] + sum over layers of 2 * N1 * N2 * q * P_layer (or the
      Gram cost), S the samples pushed through forward/backward passes, plus the jacobian cost
      of any parameter outside structured layers;
    * ntvp:      1.5 * N2 * O * (3 + 2.5 * N1) * [FP].

    (1.5: per-sample vmapped kernels against batched ones.) ``auto`` takes the cheapest plan that
    fits ``memory_budget_bytes``: in practice ``layerwise`` for CNNs/MLPs built from
    Linear/Conv2d/BatchNorm, ``jacobian`` for other models (blocked by samples, then by parameter
    groups as the budget shrinks), ``ntvp`` when not even one sample's O*P Jacobian fits. The
    chosen plan is reported in ``result.schedule`` and ``result.est_gflop``. When the kernel
    itself or every method's smallest working set exceeds the budget a :class:`UserError` says so
    before anything large is allocated, with the N that would fit and what to use instead.
    ``block_size`` forces the number of samples per block (for tests and tuning).

    Raises :class:`UserError` for unknown kind/method, mismatched inputs, parameter filters that
    select nothing, non-finite model outputs and impossible budgets.
    """
    t0 = time.perf_counter()
    kind = _enum(NtkKind, kind, "NTK kind")
    method = _enum(NtkMethod, method, "NTK method")
    if memory_budget_bytes is None or memory_budget_bytes <= 0:
        raise UserError(f"memory_budget_bytes must be positive, got {memory_budget_bytes!r}")
    if block_size is not None and int(block_size) < 1:
        raise UserError(f"block_size must be a positive integer, got {block_size!r}")
    fm = functionalize(model, param_filter=param_filter, dtype=dtype, device=device)
    notes: list[str] = []
    if any(m.training for m in model.modules()):
        notes.append("model was in train mode: evaluated in eval mode (BatchNorm running statistics, "
                     "dropout off); the model's modes are restored")
    with eval_mode(model):
        x1, x2, sym = _prepare_inputs(fm, x1, x2)
        layers = _find_layers(fm) if not _couples_samples(model) else []
        stats = _measure(fm, x1[:1].clone(), layers)
        itemsize = torch.empty((), dtype=fm.dtype).element_size()
        c = _Ctx(fm, kind, x1, x2, sym, stats, itemsize, int(memory_budget_bytes))
        free = c.budget - c.kernel_bytes
        if free <= 0:
            fit = _fit_n(c.budget // 2, c.q, None if sym else c.n2)
            raise UserError(
                f"the {kind.value} kernel for N1={c.n1}, N2={c.n2}, O={c.O} alone needs "
                f"{_mib(c.kernel_bytes)} (float64) but memory_budget_bytes is {_mib(c.budget)}; "
                f"at most N1={fit} samples fit with half the budget left for the work. Use fewer "
                f"samples, kind='trace' (N x N), ntk_topk_lanczos(...) for the top eigenvalues "
                f"without forming the kernel, or raise memory_budget_bytes")
        act_bytes = max(1, 3 * stats.saved_numel * itemsize)
        chunk = max(1, min(c.n1, free // act_bytes))
        y_max = _check_finite(fm, x1, chunk, "x1")
        if not sym:
            y_max = max(y_max, _check_finite(fm, x2, chunk, "x2"))
        if dtype is None and fm.dtype != torch.float64 and _out_of_range(fm.dtype, y_max):
            res = empirical_ntk(model, x1, x2, kind=kind, method=method,
                                memory_budget_bytes=memory_budget_bytes, block_size=block_size,
                                param_filter=param_filter, dtype=torch.float64, device=device,
                                progress=progress)
            return _promoted(res, t0, fm.dtype, y_max)

        plans: list[_Plan] = []
        if method in (NtkMethod.AUTO, NtkMethod.LAYERWISE):
            if _couples_samples(model):
                plans.append(_Plan(NtkMethod.LAYERWISE, False, reason="the model has BatchNorm "
                                   "without running statistics (samples are coupled in eval mode)"))
            else:
                good, fallback, bad = _checked_layers(c, layers)
                if bad:
                    notes.append(f"layerwise: {len(bad)} parameter tensor(s) failed the closed-form "
                                 f"check and use the generic Jacobian path")
                plans.append(_plan_layerwise(c, good, fallback, free, block_size))
        if method in (NtkMethod.AUTO, NtkMethod.JACOBIAN):
            plans.append(_plan_jacobian(c, list(fm.params), free, block_size))
        if method in (NtkMethod.AUTO, NtkMethod.NTVP):
            plans.append(_plan_ntvp(c, free, block_size))
        feasible = [p for p in plans if p.feasible]
        if not feasible:
            need = min(p.min_bytes for p in plans if p.min_bytes > 0) if any(
                p.min_bytes > 0 for p in plans) else 0
            best = min((p for p in plans if p.min_bytes > 0), key=lambda p: p.min_bytes, default=None)
            fit = _fit_n(c.budget - need, c.q, None if sym else c.n2)
            why = "; ".join(f"{p.method.value}: {p.reason}" for p in plans)
            hint = (f"method={best.method.value!r} needs memory_budget_bytes >= "
                    f"{_mib(need + c.kernel_bytes)} for this N" if best else "raise memory_budget_bytes")
            fits = (f"with this budget at most N={fit} samples fit" if fit >= 1 else
                    "with this budget not even one sample fits")
            raise UserError(f"no NTK method fits memory_budget_bytes={_mib(c.budget)} (kernel "
                            f"{_mib(c.kernel_bytes)}): {why}. {hint}; {fits}")
        plan = min(feasible, key=lambda p: p.cost)

        K = torch.zeros(_block_shape(kind, c.n1, c.n2, c.O), dtype=torch.float64, device=fm.device)
        total = plan.n_blocks + (plan.fallback.n_blocks if plan.fallback else 0)
        with _progress(total, f"ntk {kind.value} ({plan.method.value})", progress) as pbar:
            if plan.method == NtkMethod.JACOBIAN:
                _run_jacobian(c, plan, list(fm.params), K, pbar)
            elif plan.method == NtkMethod.NTVP:
                _run_ntvp(c, plan, K, pbar)
            else:
                _run_layerwise(c, plan, K, pbar)
                if plan.fallback is not None:
                    names = [n for n in fm.params if n not in {m for lay in plan.layers
                                                                for m in lay.names}]
                    _run_jacobian(c, plan.fallback, names, K, pbar)
                    notes.append(f"layerwise: {len(names)} parameter tensor(s) outside "
                                 f"Linear/Conv2d/BatchNorm layers via the Jacobian path")
    if not bool(torch.isfinite(K).all()):
        raise _overflow_error(fm.dtype, y_max, f"{kind.value} kernel")
    if kind == NtkKind.FULL:
        K = K.reshape(c.n1 * c.O, c.n2 * c.O)
    if sym:   # exactly symmetric (blocks on the diagonal and NTVP columns carry rounding asymmetry)
        K = 0.5 * (K + K.transpose(-1, -2))
    kernel = K.cpu().numpy()
    bn_mode = "eval" if _has_batchnorm(model) else "none"
    return NtkResult(kernel=kernel, kind=kind.value, method=plan.method.value, n1=c.n1, n2=c.n2,
                     n_outputs=c.O, n_params=fm.n_params, dtype=str(fm.dtype).replace("torch.", ""),
                     wall_time_s=time.perf_counter() - t0,
                     peak_memory_bytes=int(plan.peak_bytes + c.kernel_bytes), symmetric=sym,
                     n_blocks=plan.n_blocks + (plan.fallback.n_blocks if plan.fallback else 0),
                     schedule=plan.schedule, bn_mode=bn_mode, est_gflop=plan.flops / 1e9,
                     param_filter=None if param_filter is None else repr(param_filter),
                     notes=tuple(notes))


# --------------------------------------------------------------------------------------------
# Public: spectrum
# --------------------------------------------------------------------------------------------


def _targets(y, n_rows: int) -> np.ndarray:
    """Labels/targets as an (n_rows, C) float64 matrix (see :func:`ntk_spectrum`)."""
    y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        classes, idx = np.unique(y, return_inverse=True)
        Y = np.zeros((y.size, classes.size))
        Y[np.arange(y.size), idx] = 1.0
        Y -= Y.mean(0, keepdims=True)
    else:
        Y = y.astype(np.float64).reshape(y.shape[0], -1)
    if Y.shape[0] == n_rows:
        return Y
    if Y.size == n_rows:                       # (N, O) targets against a full (N*O) kernel
        return Y.reshape(n_rows, 1)
    raise UserError(f"targets with {Y.shape[0]} rows do not match a kernel with {n_rows} rows")


def ntk_spectrum(K, y=None, *, floor: float | None = None) -> SpectrumResult:
    """Eigenvalues and spectrum summaries of a symmetric PSD kernel (float64 throughout).

    ``K``: (n, n) array/tensor, or an :class:`NtkResult` of kind ``trace`` or ``full`` (for
    ``diagonal`` pass ``result.kernel[a]``). The kernel is symmetrised, (K + K^T)/2, to remove
    rounding asymmetry before ``eigvalsh``.

    * ``eigenvalues``: descending.
    * ``floor``: eigenvalues at or below it are numerically zero; default n * eps * lambda_max
      (the rounding level of an eigen-solver in float64).
    * ``condition_number``: lambda_max / smallest eigenvalue above the floor; when some eigenvalues
      are below the floor the kernel is near-singular, ``n_below_floor`` counts them and a note
      says so (the condition number then describes the well-determined part only).
    * ``effective_rank``: exp(entropy of lambda / sum lambda) (Roy & Vetterli 2007), negatives
      clipped to 0; ``participation_ratio``: (sum lambda)^2 / sum lambda^2.
    * ``alignment`` (kernel-target alignment, Cristianini et al. 2002):
      <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F). ``y`` integer class labels (N,) become one-hot,
      centred per class column; float targets (N,) or (N, C) are used as given; against a
      ``full`` kernel (N*O rows), (N, O) targets are flattened sample-major.
    """
    notes: list[str] = []
    if isinstance(K, NtkResult):
        if K.kind == NtkKind.DIAGONAL.value:
            raise UserError("ntk_spectrum needs a square kernel: pass result.kernel[a] for output a of "
                            "a diagonal kernel, or compute kind='trace'")
        K = K.kernel
    K = np.asarray(K.detach().cpu() if isinstance(K, Tensor) else K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise UserError(f"ntk_spectrum needs a square (n, n) kernel, got shape {K.shape}")
    if not np.isfinite(K).all():
        raise UserError("the kernel has non-finite entries; recompute it in float64")
    n = K.shape[0]
    Ks = 0.5 * (K + K.T)
    ev = np.linalg.eigvalsh(Ks)[::-1].copy()
    lmax = max(float(ev[0]), 0.0)
    fl = float(floor) if floor is not None else n * np.finfo(np.float64).eps * max(lmax, 1e-300)
    pos = ev > fl
    n_below = int(n - pos.sum())
    if not pos.any():
        cond = math.inf
        notes.append("no eigenvalue above the floor: the kernel is numerically zero")
    else:
        cond = float(ev[0] / ev[pos][-1])
        if n_below:
            notes.append(f"near-singular: {n_below} of {n} eigenvalues <= floor {fl:.3g}; the condition "
                         f"number uses the smallest eigenvalue above the floor")
    if ev[-1] < -fl:
        notes.append(f"kernel has a negative eigenvalue {ev[-1]:.3g} beyond rounding (not PSD)")
    lam = np.clip(ev, 0.0, None)
    tot = lam.sum()
    if tot > 0:
        p = lam / tot
        nz = p[p > 0]
        erank = float(np.exp(-(nz * np.log(nz)).sum()))
        q = lam / lam[0]                  # scale-free: no overflow for lambda near 1e154
        pr = float(q.sum() ** 2 / (q ** 2).sum())
    else:
        erank = pr = 0.0
    align = None
    if y is not None:
        Y = _targets(y, n)
        Kn = Ks / max(float(np.abs(Ks).max()), np.finfo(np.float64).tiny)   # alignment is scale-free
        num = float(np.trace(Y.T @ Kn @ Y))
        den = float(np.linalg.norm(Kn) * np.linalg.norm(Y.T @ Y))
        align = num / den if den > 0 else 0.0
    return SpectrumResult(eigenvalues=ev, condition_number=cond, effective_rank=erank,
                          participation_ratio=pr, alignment=align, floor=fl, n_below_floor=n_below,
                          trace=float(np.trace(Ks)), notes=tuple(notes))


# --------------------------------------------------------------------------------------------
# Public: matrix-free top-k
# --------------------------------------------------------------------------------------------


class _NtkOperator:
    """v -> K v for the trace (N) or full (N*O, sample-major) NTK, by VJP then JVP, sample blocks.

    Full:  u = J^T v (one VJP per block, summed), K v = J u (one JVP per block).
    Trace: K_trace = sum_o J_o J_o^T with J_o (N, P) the Jacobian of output o, so
           K_trace v = sum_o J_o u_o with u_o = J_o^T v: the VJP with cotangent v e_o^T for each o
           and the JVP of each u_o keeping only output o. Note that (sum_o J_o)(sum_o J_o)^T v,
           a single cotangent v 1^T, would be a different kernel.
    For s vectors at once (block Lanczos) that is s (full) or s*O (trace) cotangents: the VJPs
    reuse one forward pass per block in a loop (vmapping cotangents hits slow batching rules of
    the convolution backward on CPU); the JVPs run in a loop on CPU and are vmapped over chunks of at most O tangents elsewhere.
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, kind: NtkKind, O: int, block: int,
                 per_sample: bool = False):
        self.fm, self.x, self.kind, self.O, self.block = fm, x, kind, O, block
        self.n = x.shape[0] * (O if kind == NtkKind.FULL else 1)
        self.matvecs = 0
        # a model that couples samples (BatchNorm without running statistics) is evaluated one
        # sample at a time, as in empirical_ntk; otherwise the plain batched forward is faster
        self.f = fm.batched if per_sample else (lambda p, xb: fm(p, xb).reshape(xb.shape[0], -1))

    def matmat(self, V: np.ndarray) -> np.ndarray:
        fm, O, N, f = self.fm, self.O, self.x.shape[0], self.f
        s = V.shape[1]
        self.matvecs += s
        Vt = torch.as_tensor(V, dtype=fm.dtype, device=fm.device).T.contiguous()   # (s, N*) rows
        eye = torch.eye(O, dtype=fm.dtype, device=fm.device)
        trace = self.kind == NtkKind.TRACE
        m = s * O if trace else s                      # cotangents / tangents
        U = {k: torch.zeros((m,) + p.shape, dtype=p.dtype, device=p.device)
             for k, p in fm.params.items()}
        for lo, hi in _ranges(N, self.block):
            xb = self.x[lo:hi]
            _, fn = vjp(lambda p: f(p, xb), fm.params)
            for j in range(m):
                if trace:                              # v_{j // O} e_{j % O}^T
                    cot = Vt[j // O, lo:hi, None] * eye[j % O]
                else:
                    cot = Vt[j, lo * O:hi * O].reshape(hi - lo, O)
                for k, g in fn(cot)[0].items():
                    U[k][j] += g
        out = torch.empty((N if trace else N * O, s), dtype=torch.float64, device=fm.device)
        step = O if trace else max(1, O)
        for lo, hi in _ranges(N, self.block):
            xb = self.x[lo:hi]

            def push(t):
                return jvp(lambda p: f(p, xb), (fm.params,), (t,))[1]
            if fm.device.type == "cpu":  # a loop of JVPs beats vmap's batching rules on CPU (~2x)
                JU = torch.stack([push({k: u[j] for k, u in U.items()}) for j in range(m)])  # (m, b, O)
            else:
                JU = torch.cat([vmap(push)({k: u[a:b] for k, u in U.items()})
                                for a, b in _ranges(m, step)])                      # (m, b, O)
            if trace:
                JU = JU.reshape(s, O, hi - lo, O).diagonal(dim1=1, dim2=3)          # (s, b, O)
                out[lo:hi] = JU.sum(-1).T.to(torch.float64)
            else:
                out[lo * O:hi * O] = JU.reshape(s, -1).T.to(torch.float64)
        return out.cpu().numpy()


class _GramOperator:
    """P -> M P for M = J^T J, the parameter-space twin of the NTK, one data sweep per block.

    J stacks per-sample Jacobian rows: for ``trace`` one row per sample, the outputs side by side
    (N x O*P, so K_trace = J J^T = sum_o J_o J_o^T); for ``full`` one row per (sample, output)
    (N*O x P). M = J^T J = sum_i J_i^T J_i has the NTK's non-zero eigenvalues, and, unlike
    K v = J (J^T v), a block product needs only one pass over the data: per chunk of samples one
    forward pass and O backward passes, then per sub-chunk the per-sample layer rows R (the
    closed forms of :func:`_lw_parts`; parameters outside structured layers by ``vmap(jacrev)``)
    are formed once and used twice, w = R P^T (the chunk's rows of J P) and M P += w^T R.

    Parameter-space layout of a vector (s, F): per selected parameter tensor, in ``fm.params``
    order, a block of O*numel (trace, output-major) or numel (full) elements.
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, kind: NtkKind, O: int, layers: list[_Layer],
                 fallback: Sequence[str], block: int, sub: int, pbar=None):
        self.fm, self.x, self.kind, self.O, self.layers = fm, x, kind, O, layers
        self.block, self.sub, self.pbar = max(1, block), max(1, sub), pbar
        self.fallback = list(fallback)
        width = O if kind == NtkKind.TRACE else 1
        self.seg: dict[str, tuple[int, int]] = {}
        off = 0
        for name, p in fm.params.items():
            self.seg[name] = (off, off + width * p.numel())
            off += width * p.numel()
        self.F = off
        self.n_units = x.shape[0] * (1 if kind == NtkKind.TRACE else O)
        self.sweeps = self.matvecs = 0
        self.params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
        if self.fallback:
            sub_names = set(self.fallback)
            rest = {n: p for n, p in fm.params.items() if n not in sub_names}

            def f(ps, xi):
                return fm.single({**rest, **ps}, xi)
            self._jac = vmap(jacrev(f), in_dims=(None, 0))

    def _fast(self, layer: _Layer) -> bool:
        """Rows in cache-sized blocks of (sample, output): single-call Linear, ungrouped Conv2d and
        BatchNorm; anything else goes through :func:`_lw_parts`."""
        if layer.calls != 1:
            return False
        return layer.kind in ("linear", "bn") or (layer.kind == "conv" and layer.module.groups == 1)

    def _chunks(self):
        """Per block of samples: one forward pass, O backward passes; yields (lo, hi, records,
        output gradients per record (O, b, ...))."""
        fm, O, layers = self.fm, self.O, self.layers
        for lo, hi in _ranges(self.x.shape[0], self.block):
            xb = self.x[lo:hi]
            recs, grads = [], []
            if layers:
                leaf = _input_leaf(xb)
                ctx = _lw_forward(fm, self.params, leaf if leaf is not None else xb, layers)
                zs = [r.z for r in ctx.recs]
                per_out = [torch.autograd.grad(ctx.y[:, o].sum(), zs, retain_graph=o < O - 1,
                                               allow_unused=True) for o in range(O)]
                # per record, the O output gradients (b, ...); a layer output that no output
                # depends on gets zeros
                grads = [[g if g is not None else torch.zeros_like(z) for g in gs]
                         for z, gs in zip(zs, zip(*per_out))]
                # keep the layer inputs, let the graph go
                recs = [_Rec(r.layer, r.src.detach(), None, 0, r.norm) for r in ctx.recs]
                del ctx, zs, per_out
            yield lo, hi, recs, grads
            if self.pbar is not None:
                self.pbar.update(hi - lo)

    def _blocks(self, xb: Tensor, recs: list[_Rec], grads: list[list[Tensor]]):
        """The chunk's rows of J as blocks: yields (o, c0, c1, s0, s1, R) with R (s1 - s0, c1 - c0)
        the rows of samples s0:s1 for output o in columns c0:c1 of the parameter-space layout."""
        O, layers, trace = self.O, self.layers, self.kind == NtkKind.TRACE
        b = xb.shape[0]

        def cols(name: str, o: int, numel: int) -> tuple[int, int]:
            c0 = self.seg[name][0] + (o * numel if trace else 0)
            return c0, c0 + numel

        generic: dict[int, list[int]] = defaultdict(list)            # layer -> its records
        for k, rec in enumerate(recs):
            layer = layers[rec.layer]
            if not self._fast(layer):
                generic[rec.layer].append(k)
                continue
            a, gs = rec.src, grads[k]
            if layer.kind == "bn":      # d/dw = sum_pos g * x_hat, d/db = sum_pos g
                mean, var, eps = rec.norm
                C = a.shape[1]
                inv = torch.rsqrt(var + eps)
                xhat = ((a.reshape(b, C, -1) - mean[:, None]) * inv[:, None])       # (b, C, pos)
                for o in range(O):
                    g = gs[o].reshape(b, C, -1)
                    if layer.w is not None:
                        yield (o, *cols(layer.w, o, C), 0, b, (g * xhat).sum(-1))
                    if layer.b is not None:
                        yield (o, *cols(layer.b, o, C), 0, b, g.sum(-1))
                continue
            if layer.kind == "conv":
                A = _conv_patches(layer.module, a).transpose(1, 2)          # (b, T, D)
            else:
                A = a.reshape(b, -1, a.shape[-1])                           # (b, T, d_in)
            numel = layer.module.weight.numel() if layer.w is not None else 0
            m = int(min(b, max(4, _GRAM_ROW_BYTES // (max(numel, 1) * A.element_size()))))
            for o in range(O):
                if layer.kind == "conv":
                    G = gs[o].reshape(b, gs[o].shape[1], -1)                # (b, C, T)
                else:
                    G = gs[o].reshape(b, -1, gs[o].shape[-1]).transpose(1, 2)   # (b, d_out, T)
                if layer.w is not None:
                    c0, c1 = cols(layer.w, o, numel)
                    for s0, s1 in _ranges(b, m):
                        yield o, c0, c1, s0, s1, torch.bmm(G[s0:s1], A[s0:s1]).reshape(s1 - s0, numel)
                if layer.b is not None:                                     # bias: sum over positions
                    yield (o, *cols(layer.b, o, G.shape[1]), 0, b, G.sum(-1))
        for s0, s1 in _ranges(b, self.sub):
            rows: dict[str, Tensor] = {}
            for li, ks in generic.items():
                for k in ks:
                    rec = recs[k]
                    part_rec = _Rec(rec.layer, rec.src[s0:s1], None, 0, rec.norm)
                    g = torch.stack([gk[s0:s1] for gk in grads[k]])         # (O, m, ...)
                    for name, part in _lw_parts(layers[li], part_rec, g):
                        rows[name] = part if name not in rows else rows[name] + part
            if self.fallback:
                jac = self._jac({n: self.fm.params[n] for n in self.fallback}, xb[s0:s1])
                for name in self.fallback:
                    rows[name] = jac[name].reshape(s1 - s0, O, -1)
            for name, R in rows.items():                                    # (m, O, numel)
                for o in range(O):
                    yield (o, *cols(name, o, R.shape[-1]), s0, s1, R[:, o])

    def _unit_view(self, w: Tensor, o: int) -> Tensor:
        """Rows of w (units, s) that belong to output o: all (trace) or every O-th (full)."""
        return w if self.kind == NtkKind.TRACE else w.view(-1, self.O, w.shape[-1])[:, o]

    def matmat(self, P: Tensor) -> Tensor:
        """M P for P (s, F): rows are parameter-space vectors."""
        out = torch.zeros_like(P)
        self.sweeps += 1
        self.matvecs += P.shape[0]
        per = 1 if self.kind == NtkKind.TRACE else self.O
        for lo, hi, recs, grads in self._chunks():
            xb = self.x[lo:hi]
            w = torch.zeros(((hi - lo) * per, P.shape[0]), dtype=P.dtype, device=P.device)
            for o, c0, c1, s0, s1, R in self._blocks(xb, recs, grads):         # w = R P^T
                self._unit_view(w, o)[s0:s1].addmm_(R, P[:, c0:c1].T)
            for o, c0, c1, s0, s1, R in self._blocks(xb, recs, grads):         # M P += w^T R
                out[:, c0:c1].addmm_(self._unit_view(w, o)[s0:s1].T, R)
        return out

    def rows_times(self, P: Tensor) -> Tensor:
        """J P^T: (units, s), units = samples (trace) or (sample, output) sample-major (full)."""
        per = 1 if self.kind == NtkKind.TRACE else self.O
        out = torch.zeros((self.n_units, P.shape[0]), dtype=P.dtype, device=P.device)
        for lo, hi, recs, grads in self._chunks():
            w = out[lo * per:hi * per]
            for o, c0, c1, s0, s1, R in self._blocks(self.x[lo:hi], recs, grads):
                self._unit_view(w, o)[s0:s1].addmm_(R, P[:, c0:c1].T)
        return out


def _norm64(t: Tensor, dim: int | None = None) -> Tensor:
    """Euclidean norm accumulated in float64: a float32 norm squares its entries in float32 and
    overflows to inf beyond ~1.8e19 (Krylov vectors of a multiplicative network reach 1e25)."""
    return torch.linalg.vector_norm(t, dim=dim, dtype=torch.float64)


def _dot64(A: Tensor, B: Tensor, chunk: int = 1 << 16) -> Tensor:
    """A @ B^T (rows of A against rows of B) accumulated in float64 over column chunks: inner
    products over millions of float32 elements would otherwise carry ~1e-5 relative error."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros((A.shape[0], B.shape[0]), dtype=torch.float64, device=A.device)
    for c0 in range(0, A.shape[1], chunk):
        out += A[:, c0:c0 + chunk].double() @ B[:, c0:c0 + chunk].double().T
    return out


def _gram_lanczos(op: Callable[[Tensor], Tensor], F: int, k: int, s: int, max_dim: int, tol: float,
                  gen: torch.Generator, dtype: torch.dtype, device: torch.device
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, int, Tensor]:
    """Block Lanczos with full reorthogonalisation for the top-k eigenpairs of a symmetric PSD
    operator on R^F whose vectors are too long to keep twice (parameter space).

    Keeps the basis Q (dim x F, rows, in ``dtype``) and the exact projection T = Q^T M Q (float64,
    dim x dim), filled one block column at a time as M Q_j arrives, but not M Q itself: every
    earlier M Q_i lies in span(Q) (its remainder became the next block), so M Q = Q T + W E^T with
    W the last block's remainder (orthogonalised twice, "twice is enough"), and a Ritz pair
    (theta, Q y) has residual ||M Q y - theta Q y|| = ||W^T y_last|| exactly. Inner products are
    accumulated in float64 (:func:`_dot64`). Blocks have s vectors, so an eigenvalue of
    multiplicity up to s is resolved; directions that vanish (an invariant subspace) are replaced
    by random ones. Convergence is judged by the residuals alone: past the operator's rank the
    Krylov space is spanned in exact arithmetic, but in float32 its small-eigenvalue directions
    are lost to rounding, so a full dimension proves nothing. Returns (theta desc (k,), Ritz
    coefficients (dim, k) on the basis rows, residual norms (k,), converged, dim, basis (dim, F)).
    """
    def orth(W: Tensor, B: Tensor) -> Tensor:                  # in place, twice
        for _ in range(2):
            if B.shape[0]:
                W.addmm_(_dot64(W, B).to(W.dtype), B, alpha=-1)
        return W

    def svqb(W: Tensor, floor: float) -> Tensor:
        """Orthonormal rows spanning W's rows (those above ``floor`` in singular value), from the
        eigendecomposition of the float64 Gram matrix (SVQB, Stathopoulos & Wu 2002): unlike a
        float32 Householder QR over millions of elements, orthonormal to float32 rounding."""
        lam, V = torch.linalg.eigh(_dot64(W, W))
        keep = lam > floor ** 2
        X = V[:, keep] / lam[keep].sqrt()                               # (bs, r) float64
        return X.T.to(W.dtype) @ W

    def orthonormal_rows(W: Tensor, B: Tensor) -> Tensor:
        ref = float(torch.sqrt(torch.diagonal(_dot64(W, W)).max())) if W.numel() else 0.0
        want = W.shape[0]
        Q = svqb(orth(W, B), 1e-6 * max(ref, 1e-300))
        while Q.shape[0] < want:                     # invariant subspace found: random directions
            fresh = torch.randn((want - Q.shape[0], F), generator=gen, dtype=torch.float64)
            fresh = orth(orth(fresh.to(device=device, dtype=dtype), B), Q)
            Q = torch.cat([Q, svqb(fresh, 1e-3)])
        return svqb(orth(Q, B), 0.5)                 # twice is enough

    max_dim = min(max_dim, F)
    basis = torch.empty((max_dim, F), dtype=dtype, device=device)
    T = np.zeros((max_dim, max_dim))
    start = torch.randn((s, F), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    Q = orthonormal_rows(start, basis[:0])
    del start
    dim, scale = 0, 0.0
    while True:
        bs = Q.shape[0]
        basis[dim:dim + bs] = Q
        del Q
        W = op(basis[dim:dim + bs])                                       # M Q_j, (bs, F)
        dim += bs
        B = basis[:dim]
        C = _dot64(B, W)                                                  # (dim, bs) float64
        T[:dim, dim - bs:dim] = C.cpu().numpy()
        T[dim - bs:dim, :dim] = T[:dim, dim - bs:dim].T
        Tt = T[:dim, :dim]
        evals, S = np.linalg.eigh(0.5 * (Tt + Tt.T))
        order = np.argsort(evals)[::-1][:k]
        theta, Sk = evals[order], S[:, order]
        scale = max(scale, float(np.abs(evals).max()), 1e-300)
        W.addmm_(C.T.to(W.dtype), B, alpha=-1)                            # remainder of M Q_j
        orth(W, B)
        G = _dot64(W, W).cpu().numpy()
        last = Sk[dim - bs:dim]                                           # (bs, k)
        res = np.sqrt(np.maximum(np.einsum("ik,ij,jk->k", last, G, last), 0.0))
        converged = dim >= F or (dim >= k and bool((res <= tol * scale).all()))
        step = min(s, F - dim, max_dim - dim)
        if converged or step <= 0:
            return theta, Sk, res, converged, dim, B
        Q = orthonormal_rows(W[:step] if step < bs else W, B)
        del W


def _block_lanczos(op, n: int, k: int, s: int, max_dim: int, tol: float, rng: np.random.Generator,
                   pbar) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, int]:
    """Block Lanczos with full reorthogonalisation for the top-k eigenpairs of a symmetric op.

    The Krylov basis is extended by blocks of s vectors, each new block orthogonalised twice
    against the whole basis ("twice is enough", Giraud et al. 2005); the Ritz pairs are those of
    the exact projection T = Q^T (A Q) (every A Q is kept), so directions that vanish at a
    breakdown can be replaced by random ones without spoiling T. A block of s vectors resolves
    eigenvalues of multiplicity up to s; for max_dim >= n the result is exact.
    Returns (theta desc (k,), Ritz vectors (n, k), residual norms (k,), converged, subspace dim).
    """
    def orth(W, Q):
        for _ in range(2):
            W = W - Q @ (Q.T @ W)
        return W

    basis = np.linalg.qr(rng.standard_normal((n, s)))[0]
    Q, AQ = basis, np.zeros((n, 0))
    scale = 0.0
    while True:
        W = op(Q)                                                       # (n, s_j)
        pbar.update(Q.shape[1])
        AQ = np.concatenate([AQ, W], axis=1)
        dim = basis.shape[1]
        T = basis.T @ AQ
        T = 0.5 * (T + T.T)
        evals, S = np.linalg.eigh(T)
        order = np.argsort(evals)[::-1][:k]
        theta, Sk = evals[order], S[:, order]
        scale = max(scale, float(np.abs(evals).max()), 1e-300)
        Y = basis @ Sk
        res = np.linalg.norm(AQ @ Sk - Y * theta, axis=0)
        converged = dim >= n or (dim >= k and bool((res <= tol * scale).all()))
        step = min(s, n - dim, max_dim - dim)
        if converged or step <= 0:
            return theta, Y, res, converged, dim
        Wn = orth(W[:, :step], basis)
        weak = np.linalg.norm(Wn, axis=0) <= 1e-8 * max(float(np.abs(W).max()), 1e-300)
        if weak.any():                                                  # invariant subspace found
            Wn[:, weak] = orth(rng.standard_normal((n, int(weak.sum()))), basis)
        Q = np.linalg.qr(Wn)[0]
        Q = np.linalg.qr(orth(Q, basis))[0]
        basis = np.concatenate([basis, Q], axis=1)


class LanczosMethod(str, Enum):
    """The operator :func:`ntk_topk_lanczos` iterates. N samples, O outputs, P parameters, s
    vectors per block, [FP] one sample's forward pass."""

    AUTO = "auto"
    """``gram`` when the model is built from Linear/Conv2d/BatchNorm layers (others through
    ``vmap(jacrev)``), treats samples independently and its Lanczos basis fits the budget;
    ``ntvp`` otherwise."""
    GRAM = "gram"
    """Block Lanczos on M = J^T J in parameter space (:class:`_GramOperator`): same non-zero
    eigenvalues as K = J J^T, and one pass over the data per block of s vectors -- one forward
    and O backward passes per sample, its layer rows R formed once in closed form, then two
    matrix products (R P^T, then w^T R). Time per block ~N*(1 + 2*O)*[FP] + 4*s*N*O*P (trace);
    memory (Krylov dim + 4*s) * O*P for the parameter-space basis plus a block of samples."""
    NTVP = "ntvp"
    """Block Lanczos on K in sample space, K v = J (J^T v) by VJPs then JVPs (:class:`_NtkOperator`):
    two passes over the data per block and O VJPs + O JVPs per vector and sample (trace), time
    ~5*s*N*O*[FP] per block; memory O(s*O*P + N*max_dim). Works for any model, also one that
    couples samples."""


def _default_block(method: "LanczosMethod", k: int) -> int:
    # gram: one data pass per block, and its matrix products are memory-bound (a block of 20 costs
    # ~1.2x one of 10): 20 to 40 vectors were fastest for top-20 on ResNet-20 kernels (6-7 passes).
    # ntvp: every vector costs its own VJPs and JVPs: single-vector Lanczos needs fewest.
    return min(k, _GRAM_BLOCK) if method == LanczosMethod.GRAM else 1


def _plan_gram(c: _Ctx, layers: list[_Layer], fallback: list[str], k: int, s: int, dim_cap: int,
               n_units: int, block_size: int | None) -> _Plan:
    """Memory plan of :class:`_GramOperator` + :func:`_gram_lanczos`: basis and blocks in parameter
    space, then the largest sample blocks that fit (``block``: forward graph and O output gradients
    per sample; ``chunk``: samples whose layer rows are formed at once)."""
    it, O, S, P = c.itemsize, c.O, c.stats.saved_numel, c.fm.n_params
    F = P * (O if c.kind == NtkKind.TRACE else 1)
    plan = _Plan(NtkMethod.LAYERWISE, False)
    sum_out = sum(layer.out_numel for layer in layers)
    clones = sum(layer.out_numel for layer in layers if layer.inplace_out)
    unf = max([layer.unfold_numel for layer in layers] + [0])
    per_sample = (2 * S + clones + O * sum_out + O) * it                # block: graph + O gradients
    per_row = (2 * O * P + unf) * it                                    # chunk: rows (+ one copy)
    work_min = per_sample + per_row

    def fixed(d: int) -> int:
        return (d + 4 * s) * F * it + 8 * d * d

    dims = dim_cap
    if fixed(dims) + work_min > c.budget:                               # shrink the Krylov space
        fit = (c.budget - work_min - 8 * dims * dims) // (F * it) - 4 * s
        dims = int(fit // s * s) if fit > 0 else 0
    need_dims = min(F, -(-k // s) * s + s)
    if dims < need_dims:
        plan.reason = (f"the parameter-space basis needs {_mib(fixed(need_dims) + work_min)} for "
                       f"{need_dims} vectors of {F} elements")
        plan.min_bytes = fixed(need_dims) + work_min
        return plan
    free = c.budget - fixed(dims)
    chunk = int(max(1, min(_GRAM_MAX_CHUNK, (free // 3) // per_row)))
    if block_size:
        block = int(block_size)
    else:
        block = int(max(chunk, min(_LANCZOS_MAX_BLOCK, (free - chunk * per_row) // per_sample)))
    chunk = min(chunk, block)
    plan.__dict__.update(feasible=True, block=min(block, c.n1), chunk=chunk,
                         peak_bytes=fixed(dims) + block * per_sample + chunk * per_row,
                         layers=layers, n_blocks=dims,
                         schedule=f"blocks of {min(block, c.n1)} samples, rows of {chunk} at once")
    plan.groups = [list(fallback)]
    return plan


def _unresolved_note(theta: np.ndarray, res: np.ndarray, tol: float) -> list[str]:
    """Convergence is relative to theta_max; a Ritz value is within its residual of an eigenvalue,
    so those with residual above 1% of their own value are not resolved (a spectrum spread over
    more orders of magnitude than 1/tol)."""
    weak = np.flatnonzero(res > 1e-2 * np.abs(theta))
    if not weak.size:
        return []
    return [f"{weak.size} of the top {theta.size} eigenvalues (from #{int(weak[0]) + 1}, below "
            f"{float(np.abs(theta[weak[0]])):.3g}) are not resolved: their residuals exceed 1% of "
            f"their value (tol={tol:g} is relative to lambda_max={float(theta[0]):.3g}); lower tol or "
            f"use float64 for them"]


def ntk_topk_lanczos(model: nn.Module, x: Tensor, k: int = 20, *, kind: NtkKind | str = "trace",
                     method: LanczosMethod | str = "auto",
                     param_filter: ParamFilter = None, dtype: torch.dtype | str | None = None,
                     device: torch.device | str | None = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                     block_size: int | None = None, block_vectors: int | None = None,
                     max_dim: int | None = None, tol: float | None = None,
                     return_eigenvectors: bool = False, seed: int = 0,
                     progress: bool = False) -> LanczosResult:
    """Top-k eigenvalues of the empirical NTK of ``model`` on ``x`` without forming the kernel.

    Block Lanczos (``block_vectors`` = s vectors per step, full reorthogonalisation) over one of
    two operators (:class:`LanczosMethod`): ``gram``, M = J^T J in parameter space, one pass over
    the data per block (per-sample layer rows in closed form); or ``ntvp``, K v = J (J^T v) by
    VJPs and JVPs in sample space. ``auto`` takes ``gram`` when it applies and fits
    ``memory_budget_bytes``. Neither forms an N x N array. Plain Lanczos (s=1) sees each
    eigenvalue once: for an eigenvalue of multiplicity m among the top k use s >= m (e.g. a kernel
    restricted to the last layer, kron(H H^T, I_O), needs s >= O with ``kind="full"``). ``s``
    defaults to min(k, 10) for ``gram`` and 1 for ``ntvp``.

    Convergence: every top-k Ritz residual (||K y - theta y||, or for ``gram`` ||M p - theta p||,
    p in parameter space) <= tol * theta_max; the eigenvalue error is then at most the residual,
    and about residual^2 / gap for separated eigenvalues. ``tol`` defaults to 1e-8 for float64
    and 1e-5 in lower precision, where the operator's own rounding (~1e-6 theta_max in float32)
    puts a floor under the residuals. ``max_dim`` caps the Krylov dimension (default
    max(10k, 100)); when reached, ``converged`` is False and a note says so. ``kind``: ``trace``
    (N x N) or ``full`` (N*O x N*O, sample-major eigenvectors). ``return_eigenvectors`` costs
    ``gram`` one more pass (y = J p / sqrt(theta)). ``block_size`` forces the samples per pass.
    """
    t0 = time.perf_counter()
    kind = _enum(NtkKind, kind, "NTK kind")
    method = _enum(LanczosMethod, method, "Lanczos method")
    if kind == NtkKind.DIAGONAL:
        raise UserError("ntk_topk_lanczos supports kind='trace' or 'full'; for one output's kernel use "
                        "param_filter/a model head with that output")
    for name, val in (("block_vectors", block_vectors), ("block_size", block_size), ("max_dim", max_dim)):
        if val is not None and int(val) < 1:
            raise UserError(f"{name} must be a positive integer, got {val!r}")
    if memory_budget_bytes is None or memory_budget_bytes <= 0:
        raise UserError(f"memory_budget_bytes must be positive, got {memory_budget_bytes!r}")
    fm = functionalize(model, param_filter=param_filter, dtype=dtype, device=device)
    notes = []
    if any(m.training for m in model.modules()):
        notes.append("model was in train mode: evaluated in eval mode; modes restored")
    with eval_mode(model):
        x, _, _ = _prepare_inputs(fm, x, None)
        couples = _couples_samples(model)
        layers = _find_layers(fm) if not couples else []
        stats = _measure(fm, x[:1].clone(), layers)
        O, N, P = stats.n_outputs, x.shape[0], fm.n_params
        n = N * (O if kind == NtkKind.FULL else 1)
        k = int(k)
        if not 1 <= k <= n:
            raise UserError(f"k must be between 1 and {n} (the kernel's size), got {k}")
        if tol is None:
            tol = 1e-8 if fm.dtype == torch.float64 else 1e-5
        it = torch.empty((), dtype=fm.dtype).element_size()
        budget = int(memory_budget_bytes)
        act_bytes = max(1, 3 * stats.saved_numel * it)
        y_max = _check_finite(fm, x, max(1, min(N, max(budget // 2, act_bytes) // act_bytes)), "x")
        if dtype is None and fm.dtype != torch.float64 and _out_of_range(fm.dtype, y_max):
            res = ntk_topk_lanczos(model, x, k, kind=kind, method=method, param_filter=param_filter,
                                   dtype=torch.float64, device=device,
                                   memory_budget_bytes=memory_budget_bytes, block_size=block_size,
                                   block_vectors=block_vectors, max_dim=max_dim, tol=tol,
                                   return_eigenvectors=return_eigenvectors, seed=seed, progress=progress)
            return _promoted(res, t0, fm.dtype, y_max)

        def finite(op, what):
            def checked(V):
                W = op(V)
                ok = bool(torch.isfinite(W).all()) if isinstance(W, Tensor) else bool(np.isfinite(W).all())
                if not ok:
                    raise _overflow_error(fm.dtype, y_max, what)
                return W
            return checked

        gram = None
        if method in (LanczosMethod.AUTO, LanczosMethod.GRAM):
            if couples:
                gram = _Plan(NtkMethod.LAYERWISE, False, reason="the model has BatchNorm without "
                             "running statistics (samples are coupled in eval mode)")
            else:
                c = _Ctx(fm, kind, x, x, True, stats, it, budget)
                good, fallback, bad = _checked_layers(c, layers)
                F = P * (O if kind == NtkKind.TRACE else 1)
                first = max(1, min(int(block_vectors or _default_block(LanczosMethod.GRAM, k)), k))
                # without a given block size, smaller blocks until the basis fits the budget
                for s in ([first] if block_vectors else sorted({first, min(first, 10), min(first, 5),
                                                                min(first, 2), 1}, reverse=True)):
                    cap = int(max_dim) if max_dim else max(10 * k, 100)
                    cap = F if cap >= F else max(cap // s * s, min(F, -(-k // s) * s + s))
                    gram = _plan_gram(c, good, fallback, k, s, cap, n, block_size)
                    if gram.feasible:
                        break
                if bad and gram.feasible:
                    notes.append(f"gram: {len(bad)} parameter tensor(s) failed the closed-form check "
                                 f"and use vmap(jacrev)")
                if gram.feasible and gram.n_blocks < cap:
                    notes.append(f"gram: Krylov dimension capped at {gram.n_blocks} by the memory budget")
            if method == LanczosMethod.GRAM and not gram.feasible:
                raise UserError(f"method='gram' cannot run: {gram.reason}; raise memory_budget_bytes "
                                f"(budget {_mib(budget)}) or use method='ntvp'")
        if gram is not None and gram.feasible:
            plan = gram
            gen = torch.Generator().manual_seed(int(seed))
            sweeps_max = -(-plan.n_blocks // s) + (1 if return_eigenvectors else 0)
            with _progress(N * sweeps_max, f"ntk lanczos ({kind.value}, gram, {s} vectors/pass)",
                           progress) as pbar:
                op = _GramOperator(fm, x, kind, O, plan.layers, plan.groups[0], plan.block, plan.chunk,
                                   pbar)
                theta, Sk, res, converged, dim, basis = _gram_lanczos(
                    finite(op.matmat, "parameter-space operator J^T J"), op.F, k, s, plan.n_blocks, tol,
                    gen, fm.dtype, fm.device)
                Y = None
                if return_eigenvectors:                     # y = J p / ||J p||, p the Ritz vectors
                    Pk = torch.as_tensor(Sk.T, dtype=fm.dtype, device=fm.device) @ basis   # (k, F)
                    JY = op.rows_times(Pk).to(torch.float64).cpu().numpy()              # (n, k)
                    Y = JY / np.maximum(np.linalg.norm(JY, axis=0), 1e-300)
                del basis
            if not converged:
                notes.append(f"not converged within a Krylov dimension of {dim}: raise max_dim or "
                             f"memory_budget_bytes (largest residual {res.max():.3g})")
            notes.extend(_unresolved_note(theta, res, tol))
            return LanczosResult(eigenvalues=theta, eigenvectors=Y, residuals=res, n_matvecs=op.matvecs,
                                 converged=bool(converged), kind=kind.value, n=N, n_outputs=O,
                                 n_params=P, dtype=str(fm.dtype).replace("torch.", ""),
                                 wall_time_s=time.perf_counter() - t0,
                                 peak_memory_bytes=int(plan.peak_bytes), block_vectors=s,
                                 subspace_dim=dim, method=LanczosMethod.GRAM.value,
                                 n_passes=op.sweeps, notes=tuple(notes))
        if gram is not None and method == LanczosMethod.AUTO:
            notes.append(f"gram operator not used ({gram.reason}): VJP/JVP products instead")

        s = max(1, min(int(block_vectors or _default_block(LanczosMethod.NTVP, k)), k))
        dim_cap = min(n, int(max_dim) if max_dim else max(10 * k, 100))
        dim_cap = max(dim_cap, min(n, k + s))
        m = s * (O if kind == NtkKind.TRACE else 1)            # vectors pushed through at once
        fixed = (m + 2) * P * it + 16 * n * (dim_cap + 2 * s)  # tangents, gradient; basis, A*basis
        # per sample: the VJP's forward graph and backward wave; the JVPs (O tangents at a time)
        # keep no graph, only a few layers' primal and tangent activations
        per_sample = ((2 + min(m, O) / 2) * stats.saved_numel + 2 * m * O) * it
        per_sample = int(per_sample)
        free = budget - fixed
        b = int(block_size) if block_size else (free // per_sample if free > 0 else 0)
        if b < 1 or free < per_sample:
            need = fixed + per_sample
            raise UserError(f"matrix-free NTK needs at least {_mib(need)} (tangents {m} x P={P}, "
                            f"Lanczos basis, one sample's activations) but memory_budget_bytes is "
                            f"{_mib(memory_budget_bytes)}; raise it or use block_vectors=1")
        # beyond a few hundred samples per block the passes get memory-bound (measured on CPU:
        # 2000-sample blocks ~1.4x slower per sample than 250-500)
        b = min(b, N, _LANCZOS_MAX_BLOCK) if not block_size else min(b, N)
        op = _NtkOperator(fm, x, kind, O, b, per_sample=couples)
        rng = np.random.default_rng(seed)
        with _progress(dim_cap, f"ntk lanczos ({kind.value}, ntvp)", progress) as pbar:
            theta, Y, res, converged, dim = _block_lanczos(finite(op.matmat, "NTK-vector product"), n, k, s,
                                                           dim_cap, tol, rng, pbar)
    if not converged:
        notes.append(f"not converged within a Krylov dimension of {dim}: raise max_dim "
                     f"(largest residual {res.max():.3g})")
    notes.extend(_unresolved_note(theta, res, tol))
    return LanczosResult(eigenvalues=theta, eigenvectors=Y if return_eigenvectors else None,
                         residuals=res, n_matvecs=op.matvecs, converged=bool(converged),
                         kind=kind.value, n=N, n_outputs=O, n_params=P,
                         dtype=str(fm.dtype).replace("torch.", ""),
                         wall_time_s=time.perf_counter() - t0,
                         peak_memory_bytes=int(fixed + b * per_sample), block_vectors=s,
                         subspace_dim=dim, method=LanczosMethod.NTVP.value,
                         n_passes=2 * -(-op.matvecs // s), notes=tuple(notes))
