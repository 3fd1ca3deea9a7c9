"""The baselines of ``benchmarks/bench_hessian.py``: PyHessian, curvlinops and hessian-eigenthings
(their pinned packages, their import names), ours and the two hand-written single-product floors
behind one adapter each (``SETUPS``: set-up on a model, batch and labels, every product counted),
one product with each (:func:`one_hvp`), and each library's ladder of top-k settings.
Everything here runs inside a worker, after the library's folder was put on its ``sys.path``.
"""
from __future__ import annotations

LIBRARIES = ["pyhessian", "curvlinops", "eigenthings"]
PACKAGES = ["pyhessian==0.1", "hessian-eigenthings==1.0.0a5", "curvlinops-for-pytorch==3.0.1",
            "backpack-for-pytorch", "einops", "unfoldNd", "einconv", "linear_operator==0.6.1", "opt-einsum"]
IMPORTS = {"pyhessian": "pyhessian", "curvlinops": "curvlinops", "eigenthings": "hessian_eigenthings"}


def flat_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def split_flat(v, params):
    """A flat vector (P,) as a list of tensors shaped like ``params``."""
    out, off = [], 0
    for p in params:
        out.append(v[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


class Counter:
    """Counts Hessian-vector products (one per vector)."""

    def __init__(self):
        self.n = 0

    def add(self, k: int = 1):
        self.n += int(k)


def _criterion():
    from torch import nn
    return nn.CrossEntropyLoss()           # reduction "mean"; curvlinops reads .reduction


def setup_ours(model, x, y, counter, case):
    from probe import curvature_operator
    op = curvature_operator(model, x, y, criterion="cross_entropy")

    def mv(V):                                          # V (P, b)
        counter.add(V.shape[1])
        return op.matmat(V)
    return {"op": op, "mv": mv}


def setup_pyhessian(model, x, y, counter, case):
    import importlib
    ph = importlib.import_module("pyhessian.hessian")   # the module (the package re-exports the class)
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):                    # the function its methods call
        counter.add(1)
        return original(gradsH, params, v)
    ph.hessian_vector_product = counted
    H = ph.hessian(model, _criterion(), data=(x, y), cuda=x.is_cuda)
    return {"H": H, "original": original}


class CurvlinopsChunked:
    """Duck-typed stand-in for a curvlinops linear operator (what its trace and spectrum
    functions use: ``shape``, ``device``, ``dtype``, ``@``, ``to_scipy``): products of the wrapped
    ``HessianLinearOperator`` on at most ``chunk`` columns at a time (None: all at once, as
    shipped), counted."""

    def __init__(self, H, counter: Counter, chunk: int | None):
        self.H, self.counter, self.chunk = H, counter, chunk
        self.shape, self.device, self.dtype = H.shape, H.device, H.dtype

    def __matmul__(self, X):
        import torch
        if X.dim() == 1:
            self.counter.add(1)
            return self.H @ X
        self.counter.add(X.shape[1])
        if self.chunk is None or X.shape[1] <= self.chunk:
            return self.H @ X
        return torch.cat([self.H @ X[:, lo:lo + self.chunk] for lo in range(0, X.shape[1], self.chunk)], 1)

    def to_scipy(self):
        import numpy as np
        import torch
        from scipy.sparse.linalg import LinearOperator

        def mm(X):                                     # (P,) or (P, K) float64 arrays
            out = self @ torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return out.detach().cpu().numpy().astype(np.float64).reshape(X.shape)
        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm, dtype=np.float64)


def setup_curvlinops(model, x, y, counter, case):
    from curvlinops import HessianLinearOperator
    H = HessianLinearOperator(model, _criterion(), flat_params(model), [(x, y)])
    return {"H": H, "A": CurvlinopsChunked(H, counter, case.get("chunk"))}


def setup_eigenthings(model, x, y, counter, case):
    import torch.nn.functional as F
    from hessian_eigenthings import HessianOperator, LambdaOperator, supervised_loss
    op = HessianOperator(model, [(x, y)], supervised_loss(F.cross_entropy))

    def mv(v):
        counter.add(1)
        return op.matvec(v)
    return {"op": op, "cop": LambdaOperator(mv, op.size, device=op.device, dtype=op.dtype)}


def setup_floor_jvp(model, x, y, counter, case):
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jvp
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p):
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    def hvp(v):
        t = dict(zip(params, split_flat(v, list(params.values()))))
        out = jvp(grad(loss), (params,), (t,))[1]
        return out
    return {"hvp": hvp}


def setup_floor_dbl(model, x, y, counter, case):
    import torch
    import torch.nn.functional as F
    params = flat_params(model)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(v):
        return torch.autograd.grad(grads, params, split_flat(v, params), retain_graph=True)
    return {"hvp": hvp}


SETUPS = {"ours": setup_ours, "pyhessian": setup_pyhessian, "curvlinops": setup_curvlinops,
          "eigenthings": setup_eigenthings, "floor_jvp": setup_floor_jvp, "floor_dbl": setup_floor_dbl}


def one_hvp(lib: str, h: dict, v, model):
    """H v (flat, float64 numpy-able tensor) with library ``lib``'s product."""
    import torch
    params = flat_params(model)
    if lib == "ours":
        return h["mv"](v[:, None])[:, 0]
    if lib == "pyhessian":
        out = h["original"](h["H"].gradsH, h["H"].params, split_flat(v, params))
        return torch.cat([o.reshape(-1) for o in out])
    if lib == "curvlinops":
        return h["H"] @ v
    if lib == "eigenthings":
        return h["op"].matvec(v)
    out = h["hvp"](v)
    vals = out.values() if isinstance(out, dict) else out
    return torch.cat([o.reshape(-1) for o in vals])


def ladder(lib: str, k: int) -> list[dict]:
    """Settings from cheapest to most expensive (the first that reaches the accuracy is reported)."""
    if lib == "ours":                 # relative residual tolerance of block Lanczos (library default 1e-5)
        return [{"tol": t} for t in (1e-1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-5)]
    if lib == "pyhessian":            # power iteration: relative change between iterations (default 1e-3)
        return [{"tol": t, "max_iter": 100} for t in (1e-3, 1e-4, 1e-5)]
    if lib == "curvlinops":           # ARPACK relative accuracy (scipy default 0: machine precision)
        return [{"tol": t} for t in (1e-1, 1e-2, 1e-3, 1e-4, 0.0)]
    if lib == "eigenthings":          # Lanczos steps (library default 2k)
        return [{"max_iter": m} for m in sorted({2 * k, 10, 15, 20, 30, 45, 60, 90}) if m >= max(k, 2)]
    raise ValueError(lib)
