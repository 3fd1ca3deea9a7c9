"""Curvature operators of the loss in parameter space, as :class:`probe.linalg.SymmetricOperator`.

Both act on the *selected* parameters of a :class:`probe.functional.FunctionalModel`, flattened
in ``fm.params`` order (``size`` = P), with vectors in the model's dtype on its device:

* :class:`HessianOperator`: H = d^2 L / d theta^2 of the mean loss L over a fixed data subset,
  H v by a backward pass through the kept graph of the gradient (reverse-over-reverse, built
  once), or by forward-over-reverse, ``jvp`` of ``grad`` of the loss (a forward and a backward
  pass with tangents per vector).
* :class:`GGNOperator`: the generalized Gauss-Newton G = J^T H_out J, J the Jacobian of the
  model outputs and H_out the Hessian of the loss with respect to those outputs (per sample
  diag(p) - p p^T for softmax cross-entropy, 2/(n O) I for the mean squared error over n
  samples with O outputs). G v by a JVP (J v), the output Hessian (a VJP of the loss gradient in
  output space, exact for any twice-differentiable criterion) and a VJP (J^T u). PSD for any
  criterion convex in the outputs.

The loss. ``criterion(outputs (b, ...), targets (b, ...))`` returns the *mean* loss over the b
samples of a batch (``torch.nn.functional.cross_entropy`` and ``mse_loss`` with their default
reduction do). The loss over the n samples of the subset is computed in mini-batches of
``batch_size``: L = sum_batches (b / n) * criterion(batch), so H v and G v are the
sample-weighted sums of per-batch products and a subset of any size fits memory.

BatchNorm. ``bn="eval"`` (default): running statistics (every module in eval mode, as
``fm.apply``, with the explicit buffers of ``fm``). ``bn="train"``: every BatchNorm normalises by the statistics of the batch it
sees and its running statistics are neither read nor updated (the module's ``training`` and
``track_running_stats`` flags are set for the duration of each product and restored after it,
also when it raises). Batch statistics make L depend on how the subset is split, so
``bn="train"`` needs the whole subset in one batch (:func:`check_batching`, when an operator is
built; so does a BatchNorm without running statistics, which always uses batch statistics).

Unused parameters (not on the path to the loss) get zero rows and columns: ``torch.func``
returns zero gradients and tangents for them.

Vectorisation (``vectorize``). The Hessian's ``"graph"`` (its ``"auto"``) keeps the gradient's
graph and takes one backward pass per vector (:class:`HessianOperator`); ``"vmap"`` maps the
forward-over-reverse JVP over the b vectors of a block (the primal forward/backward pass is
shared, the tangent passes are batched; memory grows with the vectors mapped at once, at most
``vmap_chunk``, default 4); ``"loop"`` pushes them one at a time. For the Gauss-Newton operator
``"auto"`` is ``"vmap"``, falling back to the loop for the rest of the run, with a note, when
vmap fails on the model (an op without a batching rule). Measured on this 2-core CPU (one
thread, float32, loop vs vmap, per vector; a shared machine, so min of interleaved runs):
``tiny_add`` (5k parameters, BatchNorm, 128 samples of 8x8) HVP 45 vs 22 ms (blocks of 4), 42
vs 15 ms (8), GGN 18 vs 10 ms (4), 17 vs 8 ms (8); ``tiny_mul`` HVP 44 vs 18 ms, GGN 17 vs 10
ms (4); ``tiny_mlp`` HVP 3.7 vs 1.3 ms (4); ResNet-8 (78k parameters, 32 samples of 32x32) HVP
168 vs 144 ms, GGN 85 vs 75 ms (4); ResNet-20 (272k parameters, 200 samples of 32x32) HVP 10.2 s
at a 1.8 GB peak vs 7.4 s at 4.0 GB (4). ``batch_size`` bounds the memory of every mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from probe.errors import UserError, first_line
from probe.runtime.memory import out_of_memory
from probe.functional import FunctionalModel, batchnorm_train_mode, couples_samples, eval_mode, select_output

__all__ = ["Criterion", "HessianOperator", "GGNOperator", "check_batching",
           "has_batchnorm", "couples_samples"]

#: ``criterion(outputs (b, ...), targets (b, ...)) -> ()``: the mean loss over a batch.
Criterion = Callable[[Tensor, Tensor], Tensor]

_BN = nn.modules.batchnorm._BatchNorm
_VECTORIZE = ("auto", "graph", "loop", "vmap")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (1d/2d/3d, sync or lazy)."""
    return any(isinstance(m, _BN) for m in model.modules())


def check_batching(model: nn.Module, n: int, batch_size: int, bn: str) -> None:
    """Raise :class:`UserError` when batch statistics would make the loss depend on the
    mini-batch split: ``bn="train"`` with a model that has BatchNorm, or a BatchNorm without
    running statistics (it always normalises by the batch), and ``batch_size`` below ``n``."""
    if batch_size >= n:
        return
    if bn == "train" and has_batchnorm(model):
        raise UserError(f"bn='train' normalises by the statistics of each batch, so the loss over "
                        f"the {n} samples would depend on how they are split into mini-batches of "
                        f"{batch_size}: use a batch_size of at least {n} (the whole subset in one "
                        f"batch), fewer samples, or bn='eval'")
    if couples_samples(model):
        raise UserError(f"the model has BatchNorm layers without running statistics, which "
                        f"normalise by the statistics of each batch, so the loss over the {n} "
                        f"samples would depend on how they are split into mini-batches of "
                        f"{batch_size}: use a batch_size of at least {n} or fewer samples")


class _LossOperator:
    """What both operators share: the data subset in batches, the functional forward with the
    BatchNorm mode, the block <-> tangent-dict conversion and the product counter."""

    kind = "base"

    def __init__(self, fm: FunctionalModel, x: Tensor, y: Tensor, criterion: Criterion, *,
                 batch_size: int | None = None, bn: str = "eval", vectorize: str = "auto",
                 vmap_chunk: int | None = 4):
        if bn not in ("eval", "train"):
            raise UserError(f"unknown BatchNorm mode bn={bn!r}; choose 'eval' or 'train'")
        if vectorize not in _VECTORIZE:
            raise UserError(f"unknown vectorize={vectorize!r}; choose one of {', '.join(_VECTORIZE)}")
        if x.shape[0] != y.shape[0] or x.shape[0] < 1:
            raise UserError(f"inputs and targets must have the same positive number of samples, got "
                            f"shapes {tuple(x.shape)} and {tuple(y.shape)}")
        n = int(x.shape[0])
        self.fm, self.x, self.y, self.criterion = fm, x, y, criterion
        self.n = n
        self.batch_size = n if batch_size is None else max(1, min(int(batch_size), n))
        check_batching(fm.model, n, self.batch_size, bn)
        self.bn = bn
        self.size = fm.n_params
        self.dtype, self.device = fm.dtype, fm.device
        self.params = fm.params
        self.shapes = [(name, p.shape, p.numel()) for name, p in fm.params.items()]
        self.vectorize = "vmap" if vectorize == "auto" else vectorize
        self._fallback = vectorize == "auto"            # a failing vmap may fall back to the loop
        self.vmap_chunk = None if vmap_chunk is None else max(1, int(vmap_chunk))
        self.matvecs = 0            # vectors the operator was applied to
        self.notes: list[str] = []

    # -- the pieces ------------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        """(x_b, y_b, b / n) for the mini-batches of the subset, in order."""
        for lo in range(0, self.n, self.batch_size):
            hi = min(self.n, lo + self.batch_size)
            yield self.x[lo:hi], self.y[lo:hi], (hi - lo) / self.n

    @contextmanager
    def mode(self) -> Iterator[None]:
        """The model's modes for a product (BatchNorm eval or batch statistics), restored after."""
        if self.bn == "train":
            with batchnorm_train_mode(self.fm.model):
                yield
        else:
            with eval_mode(self.fm.model):
                yield

    def forward(self, params: Mapping[str, Tensor], xb: Tensor) -> Tensor:
        """Model outputs for the batch ``xb`` with ``params``; call inside :meth:`mode`."""
        fm = self.fm
        out = functional_call(fm.model, ({**fm.fixed, **params}, fm.buffers), (xb,))
        return select_output(out, fm.output)

    def loss(self, params: Mapping[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return self.criterion(self.forward(params, xb), yb)

    def mean_loss(self) -> float:
        """The mean loss L over the subset at the current parameters (no products counted); the
        batches' losses come to the host together, after the last batch."""
        weights, vals = [], []
        with torch.no_grad(), self.mode():
            for xb, yb, w in self.batches():
                val = self.loss(self.params, xb, yb)
                if not isinstance(val, Tensor) or val.numel() != 1:
                    got = tuple(val.shape) if isinstance(val, Tensor) else type(val).__name__
                    raise UserError(f"the criterion must return the mean loss over a batch (one "
                                    f"number), got {got}")
                weights.append(w)
                vals.append(val.reshape(()).double())
        total = 0.0
        for w, v in zip(weights, torch.stack(vals).cpu().tolist()):
            total += w * v
        return total

    def tangents(self, V: Tensor) -> dict[str, Tensor]:
        """V (P, b) -> {name: (b, *shape)} (views of a contiguous (b, P) copy of V^T)."""
        rows = V.T.to(dtype=self.dtype, device=self.device)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out, off = {}, 0
        for name, shape, numel in self.shapes:
            out[name] = rows[:, off:off + numel].reshape(rows.shape[0], *shape)
            off += numel
        return out

    def _add(self, acc: Tensor, prod: Mapping[str, Tensor], w: float) -> None:
        """acc (b, P) += w * prod flattened (prod: {name: (b, *shape)})."""
        off = 0
        for name, _, numel in self.shapes:
            acc[:, off:off + numel].add_(prod[name].reshape(acc.shape[0], numel), alpha=w)
            off += numel

    def _batch_product(self, T: dict[str, Tensor], xb: Tensor, yb: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        """Free what the operator keeps between products (nothing here)."""

    def _finished(self, acc: Tensor, b: int) -> Tensor:
        """Count the b products of the block ``acc`` (b, P) and return it as (P, b), finite."""
        self.matvecs += b
        if not bool(torch.isfinite(acc).all()):
            name = str(self.dtype).replace("torch.", "")
            raise UserError(f"{self.kind}-vector products are not finite in {name} although the loss "
                            f"is: the curvature overflows this dtype; use dtype=float64")
        return acc.T

    def matmat(self, V: Tensor) -> Tensor:
        """The operator times V (P, b) in ``dtype`` on ``device``; returns a new (P, b) tensor.
        Cost: b products (HVPs or GGN-vector products), each one pass over the subset."""
        if V.dim() != 2 or V.shape[0] != self.size:
            raise ValueError(f"expected a ({self.size}, b) block, got shape {tuple(V.shape)}")
        b = V.shape[1]
        T = self.tangents(V)
        acc = torch.zeros((b, self.size), dtype=self.dtype, device=self.device)
        with self.mode():
            for xb, yb, w in self.batches():
                self._add(acc, self._batch_product(T, xb, yb), w)
        return self._finished(acc, b)

    def _mapped(self, one: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                T: dict[str, Tensor]) -> dict[str, Tensor]:
        """``one`` applied to every tangent of T ({name: (b, *shape)}), vmapped or looped."""
        b = next(iter(T.values())).shape[0]
        if self.vectorize == "vmap" and b > 1:
            try:
                return vmap(one, chunk_size=self.vmap_chunk)(T)
            except torch.OutOfMemoryError as exc:
                raise out_of_memory(exc, f"the {self.kind} products (vmap over a block of {b} vectors)") from exc
            except UserError:      # a ValueError, but the user's mistake, not vmap's
                raise
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                if not self._fallback:
                    raise
                self.vectorize = "loop"
                first = first_line(exc)
                self.notes.append(f"{self.kind}: vmap over the vectors of a block failed ({first[:200]}); "
                                  f"products are looped")
        outs = [one({k: t[j] for k, t in T.items()}) for j in range(b)]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


class HessianOperator(_LossOperator):
    """V -> H V, H the Hessian of the mean loss over the subset with respect to the selected
    parameters (module docstring); the per-batch products are weighted by b / n and summed.

    Two ways to a product (``vectorize``):

    * ``"graph"`` (``"auto"``): reverse-over-reverse on a kept gradient graph. Per batch the
      gradient g(theta) is taken once with ``create_graph=True`` (one forward and one backward
      pass), and each vector then costs one backward pass through that graph,
      ``H v = d (g . v) / d theta``. With the whole subset in one batch (the default) the graph
      is built at the first product and kept for every later one (:meth:`release` frees it), so
      a Lanczos run or a trace estimate pays the forward pass once; with several batches each
      batch's graph is built per block of vectors and freed after it (the peak is one batch's).
    * ``"vmap"`` / ``"loop"``: forward-over-reverse, ``jvp(grad(loss_b), (theta,), (v,))`` per
      vector (the primal passes are redone for every block), vmapped over the block or looped.

    Measured on this CPU (2 threads, float32, ResNet-20 at 32x32, 200 samples, one product):
    forward-over-reverse 1.78 s, ``jvp(grad)`` by hand 1.55 s, a double backward on a kept
    graph 0.87 s (and what PyHessian does, 0.94 s): the kept graph is the fastest product
    wherever its memory (the activations of the gradient's graph, about what one training step
    holds) fits.

    ``x`` (n, ...) and ``y`` (n, ...) are the prepared subset (on ``fm.device``, floating inputs in
    ``fm.dtype``). Symmetric, not definite: negative eigenvalues are real features of the loss.
    """

    kind = "hessian"

    def __init__(self, *args, vectorize: str = "auto", **kwargs):
        super().__init__(*args, vectorize="vmap" if vectorize == "auto" else vectorize, **kwargs)
        if vectorize in ("auto", "graph"):
            self.vectorize = "graph"
        self._fallback = False
        self._kept: tuple | None = None           # (leaves, grads) of the single batch, kept

    def release(self) -> None:
        """Free the kept gradient graph (built again at the next product)."""
        self._kept = None

    def _gradient_graph(self, xb: Tensor, yb: Tensor) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
        """(leaves, gradients with their graph, the batch's loss): fresh leaves sharing the
        parameters' storage."""
        leaves = [p.detach().requires_grad_(True) for p in self.params.values()]
        with torch.enable_grad():
            loss = self.loss(dict(zip(self.params, leaves)), xb, yb)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise UserError(f"the criterion must return the mean loss over a batch (one number), got {got}")
            if not loss.requires_grad:            # no selected parameter is on the path to the loss
                return leaves, [None] * len(leaves), loss.detach()
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return leaves, [g if g is not None and g.requires_grad else None for g in grads], loss.detach()

    def mean_loss(self) -> float:
        """The mean loss over the subset. With the whole subset in one batch (kept-graph
        products) its forward pass is the one that builds the kept graph: no pass is wasted."""
        if self.vectorize != "graph" or self.batch_size < self.n:
            return super().mean_loss()
        if self._kept is None:
            with self.mode():
                self._kept = self._gradient_graph(self.x, self.y)
        return float(self._kept[2].double())

    def _double_backward(self, leaves, grads, T: dict[str, Tensor]) -> dict[str, Tensor]:
        """{name: (b, *shape)} H_b t for every tangent t of T, one backward pass each."""
        b = next(iter(T.values())).shape[0]
        live = [i for i, g in enumerate(grads) if g is not None]
        names = list(self.params)
        out = {name: torch.zeros_like(T[name]) for name in names}
        if not live:                              # the gradient does not depend on theta: H = 0
            return out
        outs = [grads[i] for i in live]
        for j in range(b):                        # d (g . t) / d theta, t as the outputs' cotangent
            hv = torch.autograd.grad(outs, leaves, [T[names[i]][j] for i in live], retain_graph=True,
                                     allow_unused=True)
            for name, h in zip(names, hv):
                if h is not None:
                    out[name][j] = h
        return out

    def matmat(self, V: Tensor) -> Tensor:
        if self.vectorize != "graph":
            return super().matmat(V)
        if V.dim() != 2 or V.shape[0] != self.size:
            raise ValueError(f"expected a ({self.size}, b) block, got shape {tuple(V.shape)}")
        b = V.shape[1]
        T = self.tangents(V)
        acc = torch.zeros((b, self.size), dtype=self.dtype, device=self.device)
        single = self.batch_size >= self.n
        for xb, yb, w in self.batches():
            if single and self._kept is not None:
                leaves, grads, _ = self._kept
            else:
                with self.mode():
                    kept = self._gradient_graph(xb, yb)
                leaves, grads = kept[0], kept[1]
                if single:
                    self._kept = kept
                del kept
            self._add(acc, self._double_backward(leaves, grads, T), w)
            del leaves, grads
        return self._finished(acc, b)

    def _batch_product(self, T, xb, yb):
        params = self.params

        def one(t):
            return jvp(grad(lambda p: self.loss(p, xb, yb)), (params,), (t,))[1]

        return self._mapped(one, T)


class GGNOperator(_LossOperator):
    """V -> G V, G = J^T H_out J the generalized Gauss-Newton matrix of the mean loss over the
    subset (module docstring). Per batch: one VJP of the outputs (its forward pass reused for
    every vector), and per vector a JVP (J v, (b, ...)), the output-space Hessian product
    H_out (J v) (a VJP of the criterion's output gradient, also set up once per batch), and the
    VJP J^T (H_out J v).
    Weighted by b / n and summed over batches like the Hessian. PSD for a criterion convex in
    the outputs (cross-entropy, squared error)."""

    kind = "ggn"

    def __init__(self, *args, vectorize: str = "auto", **kwargs):
        if vectorize == "graph":
            raise UserError("vectorize='graph' keeps the gradient's graph of the Hessian operator; the "
                            "Gauss-Newton operator takes auto, vmap or loop")
        super().__init__(*args, vectorize=vectorize, **kwargs)

    def _batch_product(self, T, xb, yb):
        params = self.params
        f = lambda p: self.forward(p, xb)                                   # noqa: E731
        z, pullback = vjp(f, params)                                        # z (b, ...) outputs
        # H_out u as the VJP of the output gradient (H_out is symmetric), reverse-over-reverse:
        # forward AD through F.mse_loss's backward fails in torch 2.13 ("ZeroTensors are
        # immutable"), and the output space is small
        _, hout = vjp(grad(lambda zz: self.criterion(zz, yb)), z.detach())

        def one(t):
            Jv = jvp(f, (params,), (t,))[1]                                 # (b, ...)
            return pullback(hout(Jv)[0])[0]

        return self._mapped(one, T)


class DataShardedOperator:
    """A loss operator over all n samples when each rank of a ``torchrun`` job holds the operator of
    its own contiguous part (n_r samples): every product and the mean loss are the ranks'
    n_r / n-weighted parts summed by an all-reduce, so every rank holds the whole product and goes
    on in step. Exact for losses that are means of per-sample terms (BatchNorm in eval mode, no
    sample coupling); equal to the single-process operator up to the order of the sums."""

    def __init__(self, local: _LossOperator, n_total: int, dist):
        self.local, self.dist = local, dist
        self.weight = local.n / n_total
        self.size, self.dtype, self.device = local.size, local.dtype, local.device
        self.n = n_total

    def __getattr__(self, name: str):          # vectorize, matvecs, notes, kind: the local operator's
        return getattr(self.__dict__["local"], name)

    def matmat(self, V: Tensor) -> Tensor:
        return self.dist.all_reduce_(self.local.matmat(V) * self.weight)

    def mean_loss(self) -> float:
        t = torch.tensor([self.local.mean_loss() * self.weight], dtype=torch.float64, device=self.device)
        return float(self.dist.all_reduce_(t)[0])

    def release(self) -> None:
        self.local.release()

