"""Recorded forward passes and per-output backward passes for the per-layer closed forms.

:func:`record_forward` runs one batched forward pass with hooks that keep every structured
layer's input and output; :func:`output_gradients` and :func:`stream_backward` then give the
output gradients g = d f_o / d z at every recorded layer output, one backward pass of
sum_i f_o(x_i) per output o (per sample that is d f_o(x_i) / d z_i, as long as the model treats
samples independently). :func:`check_closed_forms` verifies the closed forms of
:mod:`probe.autodiff.layers` against autograd on two samples before they are trusted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from probe.autodiff.layers import LayerCall, StructuredLayer, per_sample_grad_parts
from probe.functional import FunctionalModel
from probe.linalg import norm64

__all__ = ["ForwardRecord", "record_forward", "output_gradients", "stream_backward", "earliest_outputs",
           "input_leaf", "check_closed_forms", "check_cost_bytes"]


@dataclass
class ForwardRecord:
    """One recorded forward pass: outputs ``y`` (n, O) and the calls of the structured layers."""

    y: Tensor                    # (n, O)
    recs: list[LayerCall]
    n: int
    by_layer: dict[int, list[int]] = field(default_factory=dict)   # layer index -> its calls


def input_leaf(x: Tensor) -> Tensor | None:
    """A detached copy of floating inputs that requires grad (the end point of a backward pass)."""
    return x.detach().requires_grad_() if x.is_floating_point() else None


def record_forward(fm: FunctionalModel, params: dict[str, Tensor], x: Tensor,
                   layers: Sequence[StructuredLayer]) -> ForwardRecord:
    """Batched forward pass recording (input, output) of every structured layer."""
    recs: list[LayerCall] = []

    def hook_for(li: int, layer: StructuredLayer):
        def hook(mod, inputs, out):
            a = inputs[0]
            norm = (mod.running_mean, mod.running_var, mod.eps) if layer.kind == "bn" else None
            recs.append(LayerCall(li, a, out, a._version, norm))
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
    rec = ForwardRecord(y=y.reshape(x.shape[0], -1), recs=recs, n=x.shape[0])
    for k, r in enumerate(recs):
        rec.by_layer.setdefault(r.layer, []).append(k)
    return rec


def output_gradients(rec: ForwardRecord, o0: int, o1: int) -> list[Tensor]:
    """d f_o / d z for o in [o0, o1) and every recorded layer output z: (oc, n, ...) each.

    One backward pass of sum_i f_o(x_i) per output. A plain loop: vmapping the cotangents
    (``is_grads_batched``) hits slow batching rules of the convolution backward on CPU.
    """
    zs = [r.z for r in rec.recs]
    out = [torch.zeros((o1 - o0,) + z.shape, dtype=z.dtype, device=z.device) for z in zs]
    for i, o in enumerate(range(o0, o1)):
        gs = torch.autograd.grad(rec.y[:, o].sum(), zs, retain_graph=True, allow_unused=True)
        for buf, g in zip(out, gs):
            if g is not None:
                buf[i] = g
    return out


def earliest_outputs(zs: Sequence[Tensor]) -> list[int]:
    """Indices of the tensors of ``zs`` (outputs of a recorded graph) that are computed from no
    other tensor of ``zs``: a walk of the autograd graph, each node visited once."""
    own = {z.grad_fn: k for k, z in enumerate(zs) if z.grad_fn is not None}
    reaches: dict = {}                 # node -> whether it or a node below it is some z's node

    def below(fn) -> bool:             # iterative post-order (graphs can be deeper than recursion)
        stack = [(fn, False)]
        while stack:
            node, done = stack.pop()
            if node in reaches:
                continue
            nxt = [f for f, _ in node.next_functions if f is not None]
            if done:
                reaches[node] = node in own or any(reaches.get(f, False) for f in nxt)
            else:
                stack.append((node, True))
                stack.extend((f, False) for f in nxt if f not in reaches)
        return reaches[fn]

    out = []
    for k, z in enumerate(zs):
        fn = z.grad_fn
        if fn is None or not any(below(f) for f, _ in fn.next_functions if f is not None):
            out.append(k)
    return out


def stream_backward(rec: ForwardRecord, leaf: Tensor | None, outputs: Sequence[int],
                    on_grad: Callable[[int, int, Tensor], None],
                    on_done: Callable[[int], None] | None = None) -> None:
    """For each output o, one backward pass of sum_i f_o(x_i); ``on_grad(o, k, g)`` receives the
    gradient (n, ...) at the output of call k as soon as autograd computes it, so that no more
    than one layer's gradient is alive at a time, and ``on_done(o)`` (if given) runs once the
    pass of output o is over. The pass stops at the earliest layer outputs (those computed from
    no other recorded layer output, :func:`earliest_outputs`): every other layer output lies on a
    path from the model's output to one of them, and nothing below them (the first layer's input
    gradient) is computed. ``leaf`` is accepted for compatibility and not needed."""
    state = {"o": 0}
    zs = [r.z for r in rec.recs]
    targets = [zs[k] for k in earliest_outputs(zs)]
    handles = [z.register_hook(lambda g, k=k: on_grad(state["o"], k, g)) for k, z in enumerate(zs)]
    try:
        for o in outputs:
            state["o"] = o
            torch.autograd.grad(rec.y[:, o].sum(), targets, retain_graph=True, allow_unused=True)
            if on_done is not None:
                on_done(o)
    finally:
        for h in handles:
            h.remove()


def check_cost_bytes(layer: StructuredLayer, itemsize: int) -> int:
    """Working set of :func:`check_closed_forms` for one layer beyond the forward graph of two
    samples: its autograd reference and its closed-form row (one parameter-sized tensor each),
    and one more for the sum over the calls of a module called several times."""
    return (2 + (1 if layer.calls > 1 else 0)) * layer.p * itemsize


def check_closed_forms(fm: FunctionalModel, x: Tensor, layers: list[StructuredLayer], n_outputs: int
                       ) -> tuple[list[StructuredLayer], list[str]]:
    """(layers whose closed-form per-sample gradients match autograd on the samples ``x[:2]``,
    parameter names of the layers that do not).

    One forward pass of two samples, then one backward pass of sum_o w_o f_o(x_0) for random
    weights w: every layer's closed-form row of sample 0 (the closed forms are linear in the
    output gradient, and sample 1's output gradient must come out zero) against the autograd
    gradient; relative tolerance 1e-8 in float64 and 1e-3 in lower precision. Using the same
    recorded forward pass as the callers, it catches parameters used outside their module's
    forward, modules overriding forward, inputs written in place after use, modules applied to
    tensors without the batch axis and layer outputs the backward pass never reaches. Memory:
    the graph of two samples plus :func:`check_cost_bytes` per checked layer; callers bound it
    by choosing ``layers``.
    """
    O = n_outputs
    if not layers:
        return [], []
    names = [n for layer in layers for n in layer.names]
    wanted = set(names)
    xc = x[:2]
    params = {n: p.detach().requires_grad_(n in wanted) for n, p in fm.params.items()}
    leaf = input_leaf(xc)
    try:
        rec = record_forward(fm, params, leaf if leaf is not None else xc, layers)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        return [], names
    bad = {r.layer for r in rec.recs
           if r.src._version != r.version or r.src.shape[0] != rec.n or r.z.shape[0] != rec.n}
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.zeros(rec.n, O, dtype=fm.dtype, device=xc.device)
    w[0] = torch.randn(O, generator=gen, dtype=torch.float64).to(device=xc.device, dtype=fm.dtype)
    rows: dict[str, Tensor] = {}

    def on_grad(k: int, g: Tensor) -> None:
        r = rec.recs[k]
        if r.layer in bad:
            return
        try:
            first = LayerCall(r.layer, r.src[:1], None, 0, r.norm)
            for name, part in per_sample_grad_parts(layers[r.layer], first, g[:1].unsqueeze(0)):
                part = part.reshape(-1)                                      # (numel,) of sample 0
                rows[name] = part if name not in rows else rows[name] + part
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            bad.add(r.layer)

    zs = [r.z for r in rec.recs]
    handles = [z.register_hook(lambda g, k=k: on_grad(k, g)) for k, z in enumerate(zs)]
    try:                       # one pass: the reference gradient, and the hooks see every layer's
        ref = torch.autograd.grad((rec.y * w).sum(), [params[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    ref = {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, ref)}
    del rec, zs
    rtol = 1e-8 if fm.dtype == torch.float64 else 1e-3
    scale = max([float(norm64(g)) for g in ref.values()] + [1e-30])
    for li, layer in enumerate(layers):
        for n in layer.names:
            if n not in rows:                           # the backward pass never reached it
                ok = float(norm64(ref[n])) <= rtol * 1e-6 * scale and li not in bad
                if not ok:
                    bad.add(li)
                continue
            diff = rows.pop(n).sub_(ref[n].reshape(-1))                 # in place: no extra copy
            err = float(norm64(diff))
            del diff
            # written so that a non-finite error or reference fails the check
            if not err <= rtol * max(float(norm64(ref[n])), 1e-6 * scale):
                bad.add(li)
    good = [layer for li, layer in enumerate(layers) if li not in bad]
    return good, [n for li in sorted(bad) for n in layers[li].names]
