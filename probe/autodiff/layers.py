"""Closed forms of the per-sample parameter gradients of Linear, Conv2d and BatchNorm layers.

For a layer z = W a (+ b) applied at T positions (Linear: the middle axes of its input; Conv2d:
the output pixels, a the input patch there), the gradient of a scalar output f of one sample i
with respect to the layer's weight is a sum over positions of outer products of the
back-propagated output gradient g = df/dz and the layer input:

    df/dW = sum_t g_t a_t^T       (d_out x d_in),        df/db = sum_t g_t

and for an eval-mode BatchNorm y = w * x_hat + b, x_hat = (a - mu) / sqrt(var + eps) with the
running statistics, df/dw = sum_t g_t * x_hat_t and df/db = sum_t g_t (per channel). So one
forward pass (recording each layer's input a) and one backward pass per output (giving g at
each layer output) determine every sample's Jacobian row of these layers without ``vmap``.

The Gram identity contracts two samples' rows without forming them:
<df/dW (i), df'/dW (j)> = sum_{t,s} (a_it . a_js)(g_it . g'_js), cheaper than the d_out x d_in
rows when T is small (:func:`gram_factors` gives the two factors, a constant 1 appended to the
input for the bias).

Shapes: n samples, oc outputs handled at once, ``g`` the output gradients (oc, n, *z.shape[1:]).
"""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probe.functional import FunctionalModel

__all__ = ["StructuredLayer", "LayerCall", "find_structured_layers", "record_layer_calls",
           "set_layer_shapes", "conv_patches", "conv_rows_by_patches", "per_sample_grad_parts",
           "per_sample_grad_rows", "per_sample_grad_blocks", "grad_blocks_scratch_numel",
           "gram_factors"]


@dataclass
class StructuredLayer:
    """A Linear / Conv2d / BatchNorm module whose per-sample Jacobian has closed form.

    The shape fields are filled by :func:`set_layer_shapes` from one measuring forward pass.
    """

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
    gram: bool = False             # contract through the Gram identity (decided by the caller's planner)
    keep_patches: bool = False     # the caller keeps the patch matrix across outputs (its planner decides)

    @property
    def names(self) -> list[str]:
        return [n for n in (self.w, self.b) if n is not None]


@dataclass
class LayerCall:
    """One call of a structured layer during a recorded forward pass."""

    layer: int         # index into the layer list
    src: Tensor        # module input (a node of the graph; kept alive by it anyway)
    z: Tensor | None   # module output, a node of the graph (None once the graph is dropped)
    version: int       # src._version at call time, to detect later in-place writes
    norm: tuple | None = None   # BatchNorm: (running_mean, running_var, eps) used by the call


def find_structured_layers(fm: FunctionalModel) -> list[StructuredLayer]:
    """The Linear, zero-padded Conv2d and running-statistics BatchNorm modules of ``fm.model``
    with a selected parameter (``fm.params``), in module order. A module with a shared parameter
    is left out (its gradient is not its own)."""
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
        layers.append(StructuredLayer(name=mname, module=m, kind=kind, w=w, b=b))
    return layers


@contextmanager
def record_layer_calls(layers: Sequence[StructuredLayer]) -> Iterator[dict[int, list]]:
    """Forward hooks recording, per layer index, ``(input shape, output shape, output, output
    version)`` of every call made while the context is open (for :func:`set_layer_shapes`)."""
    calls: dict[int, list] = defaultdict(list)

    def hook_for(li):
        def hook(mod, inputs, out):
            calls[li].append((tuple(inputs[0].shape), tuple(out.shape), out, out._version))
        return hook

    handles = [layer.module.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def set_layer_shapes(layers: Sequence[StructuredLayer], calls: Mapping[int, list],
                     params: Mapping[str, Tensor]) -> None:
    """Fill the shape fields of ``layers`` from the calls of one forward pass
    (:func:`record_layer_calls`); an output whose version changed afterwards was modified in place."""
    for li, layer in enumerate(layers):
        rec = calls.get(li, [])
        layer.calls = len(rec)
        layer.inplace_out = any(out._version != v for _, _, out, v in rec)
        layer.p = sum(params[n].numel() for n in layer.names)
        if not rec:
            continue
        ins = [c[0] for c in rec]
        outs = [c[1] for c in rec]
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


# --------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------


def conv_patches(m: nn.Conv2d, a: Tensor) -> Tensor:
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
    (measured 2-3x at 8x8 inputs with 10 outputs; for one output at 8x8 positions and 64 input
    channels 3x), and for one output at many positions (32x32) slower."""
    return cin_g < 8 or t <= 64 or oc >= 4


def conv_rows_by_patches(layer: StructuredLayer) -> bool:
    """Whether :func:`per_sample_grad_blocks` forms a conv layer's weight rows for one output
    through its patch matrix (:func:`conv_patches`, ``unfold_numel`` elements per sample)."""
    m = layer.module
    return layer.kind == "conv" and _conv_rows_by_patches(m.in_channels // m.groups, layer.t, 1)


def _conv_weight_rows_all(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients (n, oc, C_out * C_in/G * kh * kw) of one conv call for ``oc``
    outputs at once: ``a`` (n, C_in, H, W) input, ``g`` (oc, n, C_out, H', W') output gradients.

    sum over positions of g (x) patch: one batched matmul (n, G, oc*C_out/G, T) @ (n, G, T, dk)."""
    oc, n, C = g.shape[:3]
    G = m.groups
    U = conv_patches(m, a)                                               # (n, C_in*k*k, T)
    T = U.shape[-1]
    Ug = U.reshape(n, G, -1, T).transpose(-1, -2)                        # (n, G, T, dk)
    gg = g.reshape(oc, n, G, C // G, T).permute(1, 2, 0, 3, 4).reshape(n, G, oc * (C // G), T)
    jw = torch.matmul(gg, Ug).reshape(n, G, oc, C // G, -1)              # (n, G, oc, C/G, dk)
    if G > 1:
        jw = jw.transpose(1, 2)
    return jw.reshape(n, oc, -1)


# --------------------------------------------------------------------------------------------
# Per-sample rows and Gram factors of any structured layer
# --------------------------------------------------------------------------------------------


def per_sample_grad_parts(layer: StructuredLayer, call: LayerCall, g: Tensor) -> list[tuple[str, Tensor]]:
    """Per-sample Jacobian rows of one call for a chunk of outputs: [(param name, (n, oc, numel))].

    ``call`` holds the call's input (and, for BatchNorm, its statistics); ``g``: output gradients
    (oc, n, ...), one per output in the chunk. Rows are laid out like the parameter tensor
    (``param.reshape(-1)``).
    """
    m, oc = layer.module, g.shape[0]
    a = call.src.detach()
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
                jw = (_conv_weight_rows(m, a, g[0]).unsqueeze(1) if oc == 1 else
                      torch.stack([_conv_weight_rows(m, a, g[o]) for o in range(oc)], 1))
            out.append((layer.w, jw))
        if layer.b:
            out.append((layer.b, g.reshape(oc, n, g.shape[2], -1).sum(-1).transpose(0, 1)))
    else:  # bn: d/dw = sum_pos g * x_hat = inv * (sum_pos g * a - mean * sum_pos g), d/db = sum_pos g
        mean, var, eps = call.norm
        g4 = g.reshape(oc, n, g.shape[2], -1)                           # (oc, n, C, positions)
        gsum = g4.sum(-1)                                               # (oc, n, C)
        if layer.w:
            ga = (g4 * a.reshape(1, n, a.shape[1], -1)).sum(-1)
            out.append((layer.w, ((ga - mean * gsum) * torch.rsqrt(var + eps)).transpose(0, 1)))
        if layer.b:
            out.append((layer.b, gsum.transpose(0, 1)))
    return out


def per_sample_grad_rows(layer: StructuredLayer, call: LayerCall, g: Tensor) -> Tensor:
    """(n, oc, P_layer) per-sample Jacobian rows of one call for a chunk of outputs (weight, then
    bias)."""
    parts = per_sample_grad_parts(layer, call, g)
    return parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts], dim=2)


def per_sample_grad_blocks(layer: StructuredLayer, call: LayerCall, g: Tensor, patches: Tensor | None = None,
                           out: Tensor | None = None, scratch: Tensor | None = None) -> list[Tensor]:
    """Per-sample Jacobian rows of one call for ONE output, as blocks [(n, p_i)] whose
    concatenation is the row (n, P_layer) up to a permutation of its columns that is the same for
    every sample and call of the layer: inner products of rows (kernels, sums over calls) are those
    of :func:`per_sample_grad_rows`, without its layout copies.

    ``g``: the call's output gradient (n, ...) for the output. ``patches``: the call's patch matrix
    (:func:`conv_patches`) when the caller keeps it across outputs (conv layers for which
    :func:`conv_rows_by_patches` holds). ``out``: where the weight rows of Linear layers and of
    convolutions through patches go (the first n * weight elements of it, as a contiguous (n, p)
    block), when it is large enough; ``scratch``: a flat buffer for BatchNorm's products g * a
    (n * output elements), when large enough (default ``out``). Both spare new memory per
    output; blocks that are views of them are valid until they are written again.
    """
    m = layer.module
    a = call.src.detach()
    n = a.shape[0]
    blocks = []

    def buf(*shape, where=out):
        need = math.prod(shape)
        if where is None or where.numel() < need or not where.is_contiguous():
            return None
        return where.view(-1)[:need].view(shape)

    if layer.kind == "linear":
        a3 = a.reshape(n, -1, a.shape[-1])                              # (n, T, d_in)
        g3 = g.reshape(n, -1, g.shape[-1])                              # (n, T, d_out)
        if layer.w:
            blocks.append(torch.bmm(g3.transpose(1, 2), a3, out=buf(n, g3.shape[-1], a3.shape[-1]))
                          .view(n, -1))
        if layer.b:
            blocks.append(g3.sum(1))
    elif layer.kind == "conv":
        C, G = g.shape[1], m.groups
        if layer.w:
            if _conv_rows_by_patches(a.shape[1] // G, g.shape[-2] * g.shape[-1], 1):
                U = conv_patches(m, a) if patches is None else patches           # (n, C_in*k*k, T)
                T = U.shape[-1]
                Ug = U.reshape(n * G, -1, T)
                gg = g.reshape(n * G, C // G, T)
                # (n*G, dk/G, C/G): sum over positions of patch (x) gradient
                jw = torch.bmm(Ug, gg.transpose(1, 2), out=buf(n * G, Ug.shape[1], C // G))
                blocks.append(jw.view(n, -1))
            else:
                blocks.append(_conv_weight_rows(m, a, g))
        if layer.b:
            blocks.append(g.reshape(n, C, -1).sum(-1))
    else:  # bn, as in per_sample_grad_parts
        mean, var, eps = call.norm
        g3 = g.reshape(n, g.shape[1], -1)                               # (n, C, positions)
        gsum = g3.sum(-1)
        parts = []
        if layer.w:
            a3 = a.reshape(n, a.shape[1], -1)
            prod = buf(*g3.shape, where=out if scratch is None else scratch)
            ga = (torch.mul(g3, a3, out=prod) if prod is not None else g3 * a3).sum(-1)
            parts.append((ga - mean * gsum) * torch.rsqrt(var + eps))
        if layer.b:
            parts.append(gsum)
        blocks.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
    return blocks


def grad_blocks_scratch_numel(layers: Sequence[StructuredLayer]) -> int:
    """Per sample, the scratch buffer (``out``) that lets :func:`per_sample_grad_blocks` write
    every layer of ``layers`` without new memory: the largest weight rows written into it
    (Linear; conv through patches) or BatchNorm output (Gram layers need none)."""
    return max([layer.p for layer in layers if not layer.gram and layer.w and (
        layer.kind == "linear" or conv_rows_by_patches(layer))]
        + [layer.out_numel for layer in layers if layer.kind == "bn" and layer.w and layer.calls == 1]
        + [0])


def gram_factors(layer: StructuredLayer, a: Tensor | None, g: Tensor) -> tuple[Tensor | None, Tensor]:
    """(A, G) of a Linear / ungrouped Conv2d call: (n, T, k) input features (a constant 1 for the
    bias) and (oc, n, T, d_out) gradients, so that the rows of samples i, j for outputs o, o' have
    inner product sum_{t,s} (A_it . A_js)(G_oit . G_o'js). ``a`` None: A is None (a caller that
    keeps A, or its Gram matrix, across outputs spares the patch matrix)."""
    n, oc = g.shape[1], g.shape[0]
    if layer.kind == "linear":
        G = g.reshape(oc, n, -1, g.shape[-1])
    else:
        G = g.reshape(oc, n, g.shape[2], -1).transpose(2, 3)            # (oc, n, D, C_out)
    if a is None:
        return None, G
    if layer.kind == "linear":
        A = a.reshape(n, -1, a.shape[-1])
    else:
        A = conv_patches(layer.module, a).transpose(1, 2)               # (n, D, C_in*k*k)
    if layer.b is not None:
        ones = torch.ones(A.shape[:2] + (1,), dtype=A.dtype, device=A.device)
        A = torch.cat([A, ones], dim=2) if layer.w is not None else ones
    return A, G
