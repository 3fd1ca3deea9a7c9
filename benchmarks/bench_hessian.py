"""Hessian probe: ``probe.probes.hessian`` against PyHessian, curvlinops and hessian-eigenthings.

One model, one batch, one loss for everyone: the registry's ``resnet20_add`` (ResNet-20, widths
16/32/64, BatchNorm, O=10 outputs, ~0.27 M parameters; ``create_model("resnet20_add", in_chans=3,
num_classes=10)``), float32, eval mode with BatchNorm running statistics averaged over 256 random
inputs (``benchmarks/bench_ntk.py``'s ``build``, imported, not copied), ``--n`` seeded random
3x``--size``x``--size`` inputs and seeded random labels, mean cross-entropy. Every worker rebuilds
that point from the seed and reports the loss there (the fingerprint); the parent checks that all
fingerprints agree before comparing anything.

Libraries (each in its own process, installed for the run only with
``pip install --no-deps --target <dir>``, put on the ``sys.path`` of that worker only, never a
project dependency; one that fails to install or import is reported and skipped):

* ``ours``         ``curvature_operator`` / ``hessian_spectrum`` / ``hutchpp_trace`` /
                   ``hutchinson_trace`` / ``slq_density`` of ``probe.probes.hessian``
* ``pyhessian``    PyHessian 0.1: ``hessian(model, criterion, data=(x, y), cuda=False)`` (it builds
                   the gradient graph once and reuses it for every product), ``.eigenvalues``
                   (power iteration with deflation), ``.trace(maxIter=m, tol=-inf)`` (its default
                   tol stops early), ``.density`` (calls ``torch.eig``, removed from torch: shimmed
                   onto ``torch.linalg.eigh`` inside that worker only)
* ``curvlinops``   curvlinops-for-pytorch 3.0.1: ``HessianLinearOperator`` (``jvp(jacrev)``
                   products, vmapped over all columns of a matrix), ``scipy.sparse.linalg.eigsh``
                   on ``.to_scipy()``, ``hutchinson_trace`` / ``hutchpp_trace`` as shipped (all
                   probes in one vmapped product) and through a duck-typed wrapper that feeds the
                   same operator ``--curvlinops-chunk`` columns at a time, and
                   ``lanczos_approximate_spectrum`` (Papyan's SLQ; boundaries by ``eigsh``)
* ``eigenthings``  hessian-eigenthings 1.0.0a5: ``HessianOperator`` (double backward per product),
                   ``lanczos(which="LA", reorthogonalize=True)``, ``hutchinson``,
                   ``hutch_plus_plus``, ``spectral_density``
* ``floor_jvp`` / ``floor_dbl``  hand-written single products: ``jvp(grad(loss), (params,), (v,))``
                   over ``functional_call``, and ``autograd.grad`` of a gradient graph built once
                   (PyHessian's scheme; building it is its set-up)

Quantities (tables in this order):

1. one HVP: best and median of ``--hvp-repeats`` products after one warm-up product, for every
   library and both floors; ``ours / floor`` with floor the faster floor (target <= 1.3). Each
   worker also reports v^T H v for the same seeded v (checked against ``floor_jvp``).
2. top-1 and top-``--k`` eigenvalues against a converged reference (``ours`` with
   ``--ref-tol``, Krylov dimension up to 400, k + 3 eigenpairs, ``--ref-dtype``; run once in its
   own worker and cached as JSON under ``--cache-dir``, recomputed with ``--reference``). Per
   library a short ladder of settings (tolerance or Lanczos steps), cheapest first; the first
   rung whose largest relative eigenvalue error is <= ``--rel-acc`` is reported, else the best
   rung reached (flagged); the ladder stops early when its rungs have used ``--ladder-cap-s``.
3. trace. (a) On the registry's ``tiny_add`` (ResNet-8 width 4, 5.2 k parameters, ``--small-n``
   random 3x8x8 inputs) the exact trace of the dense Hessian (``torch.func.hessian`` in float64,
   summed over single samples), and for every estimator ``--small-seeds`` estimates with
   ``--trace-matvecs`` products each: RMS relative error, mean reported standard error, the
   spread of the estimates over seeds, and the RMS of error / reported stderr (about 1 when the
   reported stderr is honest). (b) On ``resnet20_add``: wall time of one estimate with a budget of
   ``--trace-matvecs`` products (Hutch++ budgets are rounded down to a multiple of 3 where a
   library requires it), the estimate and its reported stderr.
4. density: stochastic Lanczos quadrature with ``--slq-probes`` probes x ``--slq-steps`` steps
   (or the closest each library allows): wall time, products, and the largest Ritz node against
   the reference lambda_1 where the library returns its nodes.

Every worker is a fresh subprocess under a watchdog (``--timeout-s``; ``--mem-cap-gib`` on its
resident set, read from /proc/<pid>/status every 0.2 s) so a baseline that hangs or blows up is
reported (``timeout`` / ``killed``), not fatal. Peak memory: the worker resets its high-water mark
after imports, model and data (``5`` written to /proc/self/clear_refs) and reports ``VmHWM``
(``peak``) and ``VmHWM - VmRSS`` before the call (``extra``). Wall times include each library's
set-up (building its operator or graph; shown separately). ``x ours`` = wall / ours' wall; the
targets: one HVP within 1.3x of the floor, and the top-k / trace / density at least 2x faster than
the fastest of the three libraries at equal accuracy (same budget for trace and density).

    python benchmarks/bench_hessian.py [--n 200] [--size 32] [--k 5] [--trace-matvecs 100]
        [--libraries pyhessian curvlinops eigenthings] [--parts hvp topk trace density]
        [--lib-dir DIR --skip-install] [--reference] [--timeout-s 2400] [--mem-cap-gib 10] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

LIBRARIES = ["pyhessian", "curvlinops", "eigenthings"]
PACKAGES = ["pyhessian==0.1", "hessian-eigenthings==1.0.0a5", "curvlinops-for-pytorch==3.0.1",
            "backpack-for-pytorch", "einops", "unfoldNd", "einconv", "linear_operator==0.6.1", "opt-einsum"]
IMPORTS = {"pyhessian": "pyhessian", "curvlinops": "curvlinops", "eigenthings": "hessian_eigenthings"}
PARTS = ["hvp", "topk", "trace", "density"]
MIB = 2 ** 20
GIB = 2 ** 30


# --- the point: model, batch, loss ----------------------------------------------------------------


def make_point(case: dict):
    """(model, x, y) for ``case``: the registry's model through ``bench_ntk.build`` (BatchNorm
    statistics averaged over 256 random inputs, eval mode), seeded inputs and labels."""
    import torch
    from bench_ntk import build
    name, n, size = case["model"], case["n"], case["size"]
    model, x = build(name, n, size, in_chans=3, seed=case["seed"])
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(case["seed"] + 3))
    for p in model.parameters():
        p.requires_grad_(True)
    return model, x, y


def fingerprint(model, x, y) -> float:
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y).double())


def flat_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def split_flat(v, params):
    """A flat vector (P,) as a list of tensors shaped like ``params``."""
    out, off = [], 0
    for p in params:
        out.append(v[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


def seeded_vector(P: int, seed: int):
    import torch
    return torch.randn(P, generator=torch.Generator().manual_seed(seed))


def _status_kib(field: str, pid: str = "self") -> int | None:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/<pid>/status, KiB; None when the process is gone."""
    import re
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


# --- library adapters (run inside a worker) -------------------------------------------------------


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
    from probe.probes.hessian import curvature_operator
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
    H = ph.hessian(model, _criterion(), data=(x, y), cuda=False)
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


# --- tasks ------------------------------------------------------------------------------------------


def task_hvp(case, model, x, y, counter) -> dict:
    import torch
    lib = case["lib"]
    P = sum(p.numel() for p in flat_params(model))
    t0 = time.perf_counter()
    h = SETUPS[lib](model, x, y, counter, case)
    setup = time.perf_counter() - t0
    v = seeded_vector(P, case["seed"] + 11)
    t0 = time.perf_counter()
    hv = one_hvp(lib, h, v, model)                         # warm-up (first-call costs)
    first = time.perf_counter() - t0
    vhv = float(torch.dot(v.double(), hv.detach().double()))
    times = []
    block = case.get("block", 1)
    for r in range(case["repeats"]):
        if lib == "ours" and block > 1:
            V = torch.stack([seeded_vector(P, case["seed"] + 20 + r * block + j) for j in range(block)], 1)
            t0 = time.perf_counter()
            h["mv"](V)
            times.append((time.perf_counter() - t0) / block)
        else:
            w = seeded_vector(P, case["seed"] + 20 + r)
            t0 = time.perf_counter()
            one_hvp(lib, h, w, model)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"setup_s": setup, "first_s": first, "best_s": times[0], "median_s": times[len(times) // 2],
            "times_s": times, "vhv": vhv, "n_hvps": 1 + case["repeats"] * block}


def _sorted_desc(vals) -> list[float]:
    return sorted((float(v) for v in vals), reverse=True)


def task_topk(case, model, x, y, counter) -> dict:
    import numpy as np
    import torch
    lib, k, s = case["lib"], case["k"], case["setting"]
    t0 = time.perf_counter()
    info = {}
    if lib in ("ours", "reference"):
        from probe.probes.hessian import hessian_spectrum
        kw = {"max_dim": s["max_dim"]} if "max_dim" in s else {}
        if "dtype" in s:
            kw["dtype"] = getattr(torch, s["dtype"])
        res = hessian_spectrum(model, x, y, k=k, trace=None, density=False, n_samples=None, tol=s["tol"],
                               return_eigenvectors=False, seed=case["seed"], **kw)
        setup = 0.0
        vals = res.eigenvalues
        counter.add(res.n_hvps)
        info = {"converged": bool(res.converged), "max_residual": float(res.residuals.max()),
                "residuals": [float(r) for r in res.residuals], "dim": res.largest.dim, "notes": list(res.notes)}
    else:
        h = SETUPS[lib](model, x, y, counter, case)
        setup = time.perf_counter() - t0
        if lib == "pyhessian":
            torch.manual_seed(case["seed"])
            vals, _ = h["H"].eigenvalues(maxIter=s["max_iter"], tol=s["tol"], top_n=k)
        elif lib == "curvlinops":
            from scipy.sparse.linalg import eigsh
            P = h["A"].shape[0]
            v0 = np.random.default_rng(case["seed"]).standard_normal(P)
            vals = eigsh(h["A"].to_scipy(), k=k, which="LA", tol=s["tol"], v0=v0, return_eigenvectors=False)
        elif lib == "eigenthings":
            from hessian_eigenthings import lanczos
            res = lanczos(h["cop"], k=k, max_iter=s["max_iter"], which="LA", seed=case["seed"],
                          reorthogonalize=True)
            vals = res.eigenvalues.tolist()
            info = {"converged": bool(res.converged.all())}
        else:
            raise ValueError(lib)
    wall = time.perf_counter() - t0
    return {"setup_s": setup, "wall_s": wall, "eigenvalues": _sorted_desc(vals), "n_hvps": counter.n, **info}


def _trace_estimate(case, model, x, y, counter, h) -> tuple[float, float | None]:
    """(estimate, reported stderr or None) of one trace estimate with ``case``'s method."""
    import numpy as np
    import torch
    lib, method, m, seed = case["lib"], case["method"], case["matvecs"], case["seed_trace"]
    if lib == "ours":
        from probe.linalg import hutchinson_trace, hutchpp_trace
        fn = hutchpp_trace if method == "hutch++" else hutchinson_trace
        before = h["op"].matvecs
        te = fn(h["op"], m, seed=seed, block=10)         # blocks of 10, as hessian_spectrum
        counter.add(h["op"].matvecs - before)
        return te.estimate, te.stderr
    if lib == "pyhessian":
        torch.manual_seed(seed)
        vals = np.asarray(h["H"].trace(maxIter=m, tol=-float("inf")))
        return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(vals.size))
    if lib == "eigenthings":
        from hessian_eigenthings import hutch_plus_plus, hutchinson
        if method == "hutch++":
            tr = hutch_plus_plus(h["cop"], num_matvecs=m, seed=seed)
        else:
            tr = hutchinson(h["cop"], num_samples=m, seed=seed)
        return float(tr.estimate), float(tr.stderr)
    if lib == "curvlinops":
        from curvlinops import hutchinson_trace, hutchpp_trace
        torch.manual_seed(seed)
        if method == "hutch++":
            return float(hutchpp_trace(h["A"], m - m % 3)), None
        return float(hutchinson_trace(h["A"], m)), None
    raise ValueError(lib)


def task_trace(case, model, x, y, counter) -> dict:
    t0 = time.perf_counter()
    h = SETUPS[case["lib"]](model, x, y, counter, case)
    setup = time.perf_counter() - t0
    est, se = _trace_estimate(case, model, x, y, counter, h)
    return {"setup_s": setup, "wall_s": time.perf_counter() - t0, "estimate": est, "stderr": se,
            "n_hvps": counter.n}


def task_trace_small(case, model, x, y, counter) -> dict:
    """``case["seeds"]`` estimates on the small model (one set-up), per seed: estimate, stderr."""
    t0 = time.perf_counter()
    h = SETUPS[case["lib"]](model, x, y, counter, case)
    setup = time.perf_counter() - t0
    ests, ses = [], []
    for s in range(case["seeds"]):
        est, se = _trace_estimate({**case, "seed_trace": 1000 + s}, model, x, y, counter, h)
        ests.append(est)
        ses.append(se)
    return {"setup_s": setup, "wall_s": time.perf_counter() - t0, "estimates": ests, "stderrs": ses,
            "n_hvps": counter.n}


def task_exact_small(case, model, x, y, counter) -> dict:
    """tr(H) of the small model from its dense Hessian: ``torch.func.hessian`` of the float64 loss
    of the flattened parameters, one sample at a time, weighted 1/n and summed."""
    import copy
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, hessian
    m64 = copy.deepcopy(model).double().eval()
    names = [k for k, p in m64.named_parameters()]
    shapes = [p.shape for p in m64.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    buffers = {k: b.detach() for k, b in m64.named_buffers()}
    x64, n = x.double(), x.shape[0]
    t0 = time.perf_counter()
    H = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(n):
        def loss(th, xi=x64[i:i + 1], yi=y[i:i + 1]):
            ps, off = {}, 0
            for nm, sh in zip(names, shapes):
                k = math.prod(sh)
                ps[nm] = th[off:off + k].view(sh)
                off += k
            return F.cross_entropy(functional_call(m64, (ps, buffers), (xi,)), yi)
        H += hessian(loss)(theta) / n
    sym = float((H - H.T).abs().max() / H.abs().max())
    return {"wall_s": time.perf_counter() - t0, "trace": float(H.diagonal().sum()), "P": theta.numel(),
            "frobenius": float(H.norm()), "asymmetry": sym, "lambda_max": float(torch.linalg.eigvalsh(H)[-1])}


def task_density(case, model, x, y, counter) -> dict:
    import numpy as np
    import torch
    lib, probes, steps, seed = case["lib"], case["probes"], case["steps"], case["seed"]
    t0 = time.perf_counter()
    h = SETUPS[lib](model, x, y, counter, case)
    setup = time.perf_counter() - t0
    info = {}
    if lib == "ours":
        from probe.linalg import slq_density
        d = slq_density(h["op"], probes, steps, seed=seed)
        counter.add(h["op"].matvecs)
        valid = np.arange(d.nodes.shape[1])[None, :] < d.steps[:, None]
        info = {"top_node": float(d.nodes[valid].max()), "trace_moment": d.trace}
    elif lib == "pyhessian":
        notes = []
        try:
            torch.eig(torch.eye(2), eigenvectors=True)
        except (AttributeError, RuntimeError) as exc:   # removed: a stub that raises, or gone
            def eig(T, eigenvectors=False):          # torch.eig's (n, 2) real/imag layout
                w, V = torch.linalg.eigh(T)
                return torch.stack([w, torch.zeros_like(w)], 1), V
            torch.eig = eig
            first = str(exc).strip().splitlines()[0][:60] if str(exc).strip() else type(exc).__name__
            notes.append(f"torch.eig raises ({first}...): shimmed onto torch.linalg.eigh")
        torch.manual_seed(seed)
        nodes, weights = h["H"].density(iter=steps, n_v=probes)
        info = {"top_node": float(max(max(r) for r in nodes)), "notes": notes}
    elif lib == "eigenthings":
        from hessian_eigenthings import spectral_density
        d = spectral_density(h["cop"], num_runs=probes, lanczos_steps=steps, seed=seed)
        info = {"top_node": float(torch.nan_to_num(d.raw_eigenvalues, nan=-float("inf")).max())}
    elif lib == "curvlinops":
        from curvlinops import lanczos_approximate_spectrum
        torch.manual_seed(seed)
        grid, dens = lanczos_approximate_spectrum(h["A"], ncv=steps, num_repeats=probes)
        info = {"grid_max": float(grid.max()),
                "notes": ["nodes not returned; boundaries by eigsh(k=2, which='BE', tol=1e-2), "
                          "no reorthogonalisation"]}
    else:
        raise ValueError(lib)
    return {"setup_s": setup, "wall_s": time.perf_counter() - t0, "n_hvps": counter.n, **info}


def task_import(case, model, x, y, counter) -> dict:
    mod = __import__(IMPORTS[case["lib"]])
    return {"version": getattr(mod, "__version__", "?"), "file": getattr(mod, "__file__", "?")}


TASKS = {"hvp": task_hvp, "topk": task_topk, "trace": task_trace, "trace_small": task_trace_small,
         "exact_small": task_exact_small, "density": task_density, "import": task_import}


def worker(case: dict) -> dict:
    """Builds the point, imports the library, resets the memory high-water mark, runs the task."""
    if case.get("lib_dir"):
        sys.path.insert(0, case["lib_dir"])
    import torch
    torch.manual_seed(case["seed"])
    out = {}
    if case["task"] == "import":
        model = x = y = None
    else:
        model, x, y = make_point(case)
        out["fingerprint"] = fingerprint(model, x, y)
        out["n_params"] = sum(p.numel() for p in flat_params(model))
    if case.get("lib") in IMPORTS:
        __import__(IMPORTS[case["lib"]])                 # import costs outside the measurement
    if case["task"] != "import":
        import probe.probes.hessian  # noqa: F401
    gc.collect()
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:    # VmHWM := VmRSS
            f.write("5")
    except OSError:
        pass
    print("READY " + json.dumps({"rss_base_kib": base, **out}), flush=True)
    counter = Counter()
    res = TASKS[case["task"]](case, model, x, y, counter)
    out.update(res, status="ok", rss_base_kib=base, rss_peak_kib=_status_kib("VmHWM"))
    return out


# --- the parent: spawn under a watchdog ----------------------------------------------------------


def spawn(case: dict, args, log) -> dict:
    """Runs ``case`` in a fresh subprocess under the watchdog; returns its result row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    cap_kib = int(args.mem_cap_gib * GIB / 1024)
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        pid, t0, seen_kib, why = str(proc.pid), time.monotonic(), 0, None
        while proc.poll() is None:
            rss, hwm = _status_kib("VmRSS", pid), _status_kib("VmHWM", pid)
            seen_kib = max(seen_kib, rss or 0, hwm or 0)
            if rss is not None and rss > cap_kib:
                why = f"killed above {args.mem_cap_gib:g} GiB"
            elif time.monotonic() - t0 > args.timeout_s:
                why = f"timeout after {args.timeout_s:g} s"
            if why:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        reader.join(timeout=5)
        err.seek(0)
        stderr = err.read()
    ready = next((json.loads(ln[6:]) for ln in lines if ln.startswith("READY ")), None)
    result = next((json.loads(ln[7:]) for ln in reversed(lines) if ln.startswith("RESULT ")), None)
    row = {k: v for k, v in case.items() if k not in ("lib_dir",)}
    if ready:
        row.update(ready)
    elapsed = time.monotonic() - t0
    if why:
        row.update(status="killed" if why.startswith("killed") else "timeout", message=why,
                   wall_s=elapsed, rss_peak_kib=seen_kib)
    elif proc.returncode != 0 or result is None:
        tail = " | ".join(ln for ln in stderr.strip().splitlines()[-3:])
        row.update(status="error", message=f"exit {proc.returncode}: {tail[-400:]}", rss_peak_kib=seen_kib,
                   wall_s=elapsed)
    else:
        row.update(result)
    if row.get("rss_base_kib") is not None and row.get("rss_peak_kib"):
        row["extra_mb"] = (row["rss_peak_kib"] - row["rss_base_kib"]) / 1024
    if row.get("rss_peak_kib"):
        row["peak_mb"] = row["rss_peak_kib"] / 1024
    brief = {k: v for k, v in row.items() if k not in ("eigenvalues", "residuals", "estimates", "stderrs",
                                                       "times_s", "notes")}
    log("  " + json.dumps(brief))
    return row


def install(where: str, log) -> str | None:
    """``pip install --no-deps --target where`` the baselines; None (with the reason) on failure."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--target", where] + PACKAGES
    log("installing " + " ".join(PACKAGES) + f" into {where}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"install failed ({e}); the baselines are skipped")
        return None
    if out.returncode != 0:
        tail = " ".join(out.stderr.strip().splitlines()[-2:])
        log(f"pip install failed ({tail}); the baselines are skipped")
        return None
    return where


# --- ladders for the top-k comparison ------------------------------------------------------------


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


def fmt_setting(s: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())


def rel_err(vals, ref) -> float:
    if not vals or len(vals) < len(ref):
        return float("inf")
    return max(abs(a - b) / abs(b) for a, b in zip(vals, ref))


# --- the driver ------------------------------------------------------------------------------------


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="samples in the batch (resnet20_add)")
    ap.add_argument("--size", type=int, default=32, help="input height/width (3 channels)")
    ap.add_argument("--seed", type=int, default=0, help="seed of model, inputs, labels and probes")
    ap.add_argument("--k", type=int, default=5, help="top-k eigenvalues (top-1 is always done too)")
    ap.add_argument("--rel-acc", type=float, default=1e-3, help="relative eigenvalue accuracy to reach")
    ap.add_argument("--trace-matvecs", type=int, default=100, help="products per trace estimate")
    ap.add_argument("--ours-trace-budgets", type=int, nargs="*", default=[30, 60],
                    help="smaller Hutch++ budgets for ours (the trace at an equal standard error)")
    ap.add_argument("--slq-probes", type=int, default=3, help="SLQ probe vectors")
    ap.add_argument("--slq-steps", type=int, default=50, help="Lanczos steps per SLQ probe")
    ap.add_argument("--hvp-repeats", type=int, default=3, help="timed products per library (after 1 warm-up)")
    ap.add_argument("--libraries", nargs="*", default=LIBRARIES, choices=LIBRARIES, help="baselines")
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="quantities to compare")
    ap.add_argument("--small-n", type=int, default=16, help="samples of the small model's trace check")
    ap.add_argument("--small-seeds", type=int, default=10, help="estimates per estimator on the small model")
    ap.add_argument("--curvlinops-chunk", type=int, default=4,
                    help="columns per curvlinops product in its chunked trace runs")
    ap.add_argument("--no-unchunked", action="store_true",
                    help="skip curvlinops' trace estimators as shipped (all probes in one product)")
    ap.add_argument("--ladder-cap-s", type=float, default=900.0,
                    help="stop a library's top-k ladder once its rungs have used this many seconds")
    ap.add_argument("--ref-tol", type=float, default=1e-6, help="Lanczos tolerance of the reference")
    ap.add_argument("--ref-dtype", default="float32", choices=["float32", "float64"],
                    help="dtype of the reference eigenvalues")
    ap.add_argument("--reference", action="store_true",
                    help="recompute the cached references (eigenvalues, small-model exact trace)")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "landscape_probe_bench_hessian"),
                    help="where the references are cached (JSON)")
    ap.add_argument("--lib-dir", default=None,
                    help="install the baselines here (default: a temporary directory removed at exit)")
    ap.add_argument("--skip-install", action="store_true",
                    help="use the baselines already installed in --lib-dir")
    ap.add_argument("--timeout-s", type=float, default=2400.0, help="watchdog: kill a worker after this")
    ap.add_argument("--mem-cap-gib", type=float, default=10.0,
                    help="watchdog: kill a worker whose resident set exceeds this")
    ap.add_argument("--json", action="store_true", help="print one JSON report instead of the tables")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    def log(*a):                        # progress on stderr, also with --json
        print(*a, file=sys.stderr, flush=True)
    if args.skip_install and not args.lib_dir:
        ap.error("--skip-install needs --lib-dir")
    t_start = time.monotonic()
    env = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "load_avg_start": os.getloadavg(), "python": sys.version.split()[0]}
    point = {"model": "resnet20_add", "n": args.n, "size": args.size, "seed": args.seed}
    report = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "libraries": {},
              "hvp": [], "reference": None, "topk": [], "trace_small": [], "exact_small": None, "trace": [],
              "density": [], "summary": [], "fingerprints_agree": None}
    tmp = tempfile.TemporaryDirectory()
    libs = list(args.libraries)
    lib_dir = None
    if libs:
        lib_dir = args.lib_dir or os.path.join(tmp.name, "libs")
        if not args.skip_install and install(lib_dir, log) is None:
            libs = []
    for lib in list(libs):
        log(f"import {lib}")
        r = spawn({"task": "import", "lib": lib, "seed": 0, "lib_dir": lib_dir}, args, log)
        if _ok(r):
            report["libraries"][lib] = {"version": r["version"], "file": r["file"]}
        else:
            log(f"{lib}: import failed ({r.get('message')}); skipped")
            report["libraries"][lib] = {"error": r.get("message")}
            libs.remove(lib)

    def run(case, **kw):
        return spawn({**point, **case, **kw, "lib_dir": lib_dir}, args, log)

    # 1. one HVP
    if "hvp" in args.parts:
        for lib in ["ours", "ours_block4", "floor_jvp", "floor_dbl"] + libs:
            log(f"HVP {lib}")
            real, block = ("ours", 4) if lib == "ours_block4" else (lib, 1)
            r = run({"task": "hvp", "lib": real, "repeats": args.hvp_repeats, "block": block})
            r["name"] = lib
            report["hvp"].append(r)

    # 2. reference and top-k ladders
    ref = None
    if "topk" in args.parts or "density" in args.parts:
        kref = args.k + 3
        key = f"resnet20_add_n{args.n}_s{args.size}_seed{args.seed}_k{kref}_{args.ref_dtype}_tol{args.ref_tol:g}_torch{torch.__version__}"
        path = Path(args.cache_dir) / f"bench_hessian_ref_{key}.json"
        if path.exists() and not args.reference:
            ref = json.loads(path.read_text())
            log(f"reference from cache {path}")
        else:
            log(f"reference: top-{kref}, tol {args.ref_tol:g}, {args.ref_dtype}")
            r = run({"task": "topk", "lib": "reference", "k": kref,
                     "setting": {"tol": args.ref_tol, "max_dim": 400, "dtype": args.ref_dtype}})
            if not _ok(r):
                raise SystemExit(f"the reference failed: {r.get('message')}")
            ref = {k: r[k] for k in ("eigenvalues", "residuals", "converged", "n_hvps", "wall_s", "fingerprint",
                                     "dim", "notes")}
            ref["key"] = key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ref))
        report["reference"] = ref
    if "topk" in args.parts:
        for k in sorted({1, args.k}):
            want = ref["eigenvalues"][:k]
            for lib in ["ours"] + libs:
                spent, rungs, chosen = 0.0, [], None
                for s in ladder(lib, k):
                    if spent > args.ladder_cap_s:
                        log(f"top-{k} {lib}: ladder cap {args.ladder_cap_s:g} s reached")
                        break
                    log(f"top-{k} {lib} {fmt_setting(s)}")
                    r = run({"task": "topk", "lib": lib, "k": k, "setting": s})
                    spent += r.get("wall_s", 0.0) or 0.0
                    r["err"] = rel_err(r.get("eigenvalues"), want) if _ok(r) else float("inf")
                    rungs.append(r)
                    if r["err"] <= args.rel_acc:
                        chosen = r
                        break
                met = chosen is not None
                if chosen is None:
                    okr = [r for r in rungs if _ok(r)]
                    chosen = min(okr, key=lambda r: r["err"]) if okr else rungs[-1]
                chosen = dict(chosen, met=met, rungs=[{"setting": r["setting"], "err": r["err"],
                                                       "wall_s": r.get("wall_s"), "n_hvps": r.get("n_hvps"),
                                                       "status": r["status"]} for r in rungs])
                report["topk"].append(chosen)

    # 3. trace: small model (exact) and resnet20_add (fixed budget)
    trace_methods = [("ours", "hutch++", None), ("ours", "hutchinson", None)]
    if "pyhessian" in libs:
        trace_methods.append(("pyhessian", "hutchinson", None))
    if "eigenthings" in libs:
        trace_methods += [("eigenthings", "hutchinson", None), ("eigenthings", "hutch++", None)]
    if "curvlinops" in libs:
        trace_methods += [("curvlinops", "hutchinson", None), ("curvlinops", "hutch++", None),
                          ("curvlinops", "hutchinson", args.curvlinops_chunk),
                          ("curvlinops", "hutch++", args.curvlinops_chunk)]
    if "trace" in args.parts:
        small = {"model": "tiny_add", "n": args.small_n, "size": 8, "seed": args.seed, "lib_dir": lib_dir}
        key = f"tiny_add_n{args.small_n}_s8_seed{args.seed}_torch{torch.__version__}"
        path = Path(args.cache_dir) / f"bench_hessian_exact_{key}.json"
        if path.exists() and not args.reference:
            ex = json.loads(path.read_text())
            log(f"exact small-model trace from cache {path}")
        else:
            log("exact trace of the small model (dense float64 Hessian)")
            ex = spawn({**small, "task": "exact_small", "lib": "exact"}, args, log)
            if _ok(ex):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(ex))
        report["exact_small"] = ex
        for lib, method, chunk in trace_methods:
            if chunk is not None:
                continue                                       # the small model fits unchunked
            log(f"small-model trace {lib} {method}")
            r = spawn({**small, "task": "trace_small", "lib": lib, "method": method, "chunk": None,
                       "matvecs": args.trace_matvecs, "seeds": args.small_seeds}, args, log)
            r["name"] = f"{lib} {method}"
            if _ok(r) and _ok(ex):
                import numpy as np
                t = ex["trace"]
                e = np.asarray(r["estimates"])
                r["rms_rel_err"] = float(np.sqrt(np.mean((e - t) ** 2)) / abs(t))
                r["sd_rel"] = float(e.std(ddof=1) / abs(t)) if e.size > 1 else float("nan")
                r["bias_rel"] = float((e.mean() - t) / abs(t))
                if all(s is not None for s in r["stderrs"]):
                    s = np.asarray(r["stderrs"])
                    r["mean_stderr_rel"] = float(s.mean() / abs(t))
                    r["rms_z"] = float(np.sqrt(np.mean(((e - t) / s) ** 2)))
                    r["within_2se"] = float(np.mean(np.abs(e - t) <= 2 * s))
            report["trace_small"].append(r)
        for lib, method, chunk in trace_methods:
            if lib == "curvlinops" and chunk is None and args.no_unchunked:
                continue
            name = f"{lib} {method}" + (f" (chunks of {chunk})" if chunk else "")
            log(f"trace {name}")
            r = run({"task": "trace", "lib": lib, "method": method, "chunk": chunk, "matvecs": args.trace_matvecs,
                     "seed_trace": args.seed + 1})
            r["name"] = name
            report["trace"].append(r)
        for m in args.ours_trace_budgets:                      # ours at smaller budgets: equal stderr
            if m >= args.trace_matvecs:
                continue
            name = f"ours hutch++ ({m} products)"
            log(f"trace {name}")
            r = run({"task": "trace", "lib": "ours", "method": "hutch++", "chunk": None, "matvecs": m,
                     "seed_trace": args.seed + 1})
            r["name"] = name
            r["budget"] = m
            report["trace"].append(r)

    # 4. density
    if "density" in args.parts:
        for lib in ["ours"] + libs:
            log(f"density {lib}")
            r = run({"task": "density", "lib": lib, "probes": args.slq_probes, "steps": args.slq_steps, "chunk": None})
            r["name"] = lib
            if _ok(r) and ref and r.get("top_node") is not None:
                r["top_node_rel_err"] = abs(r["top_node"] - ref["eigenvalues"][0]) / abs(ref["eigenvalues"][0])
            report["density"].append(r)

    # fingerprints
    fps = [r["fingerprint"] for part in ("hvp", "topk", "trace", "density") for r in report[part]
           if r.get("fingerprint") is not None]
    if ref:
        fps.append(ref["fingerprint"])
    report["fingerprints_agree"] = bool(fps) and max(fps) - min(fps) <= 1e-6 * abs(fps[0])
    report["fingerprint"] = fps[0] if fps else None
    summarise(report, args)
    report["total_s"] = time.monotonic() - t_start
    tmp.cleanup()
    if args.json:
        print(json.dumps(report))
        return 0
    print_report(report, args)
    return 0


# --- summary and tables ----------------------------------------------------------------------------


def _total(r) -> float:
    return r["wall_s"] if _ok(r) else float("inf")


def summarise(report: dict, args) -> None:
    """Ratios and target verdicts (added to the rows and to ``report["summary"]``)."""
    S = report["summary"]
    rows = {r["name"]: r for r in report["hvp"] if _ok(r)}
    floors = [rows[f]["best_s"] for f in ("floor_jvp", "floor_dbl") if f in rows]
    if "ours" in rows:
        ours = rows["ours"]["best_s"]
        for r in report["hvp"]:
            if _ok(r):
                r["x_ours"] = r["best_s"] / ours
        if floors:
            S.append({"quantity": "one HVP", "ours_s": ours, "floor_s": min(floors), "ratio": ours / min(floors),
                      "target": "ours / floor <= 1.3", "met": ours / min(floors) <= 1.3})
        base = [r for r in report["hvp"] if _ok(r) and r["name"] in LIBRARIES]
        if base:
            b = min(base, key=lambda r: r["best_s"])
            S.append({"quantity": "one HVP vs libraries", "ours_s": ours, "baseline": b["name"], "baseline_s": b["best_s"],
                      "speedup": b["best_s"] / ours})
    for k in sorted({r["k"] for r in report["topk"]}):
        here = [r for r in report["topk"] if r["k"] == k]
        ours = next((r for r in here if r["lib"] == "ours"), None)
        base = [r for r in here if r["lib"] != "ours" and _ok(r) and r.get("met")]
        for r in here:
            if ours is not None and _ok(r) and _ok(ours):
                r["x_ours"] = _total(r) / _total(ours)
        if ours is not None and _ok(ours):
            entry = {"quantity": f"top-{k} at {args.rel_acc:g}", "ours_s": _total(ours), "ours_met": ours.get("met")}
            if base:
                b = min(base, key=_total)
                sp = _total(b) / _total(ours)
                entry.update(baseline=b["lib"], baseline_s=_total(b), speedup=sp, target="speedup >= 2",
                             met=bool(sp >= 2 and ours.get("met")))
            S.append(entry)
    for part, label in (("trace", f"trace, {args.trace_matvecs} products"),
                        ("density", f"SLQ {args.slq_probes}x{args.slq_steps}")):
        rows_ = [r for r in report[part] if _ok(r)]
        ours = [r for r in rows_ if r["lib"] == "ours"]
        base = [r for r in rows_ if r["lib"] != "ours"]
        if not ours:
            continue
        fastest_ours = min(ours, key=_total)
        for r in report[part]:
            if _ok(r):
                r["x_ours"] = _total(r) / _total(fastest_ours)
        if part == "trace":
            # at an equal standard error: the cheapest run of ours whose reported stderr is at most
            # that of the fastest baseline reporting one, at its full budget
            with_se = [r for r in base if r.get("stderr") is not None]
            if with_se:
                b = min(with_se, key=_total)
                fit = [o for o in ours if o.get("stderr") is not None and o["stderr"] <= b["stderr"]]
                if fit:
                    o = min(fit, key=_total)
                    sp = _total(b) / _total(o)
                    S.append({"quantity": f"trace at stderr <= {b['stderr']:.3g} ({b['name']})", "ours_s": _total(o),
                              "ours": o["name"], "baseline": b["name"], "baseline_s": _total(b), "speedup": sp,
                              "target": "speedup >= 2", "met": sp >= 2})
            ours = [o for o in ours if "budget" not in o]
            for o in ours:             # like for like: the same estimator
                same = [r for r in base if r["method"] == o["method"]]
                if same:
                    b = min(same, key=_total)
                    sp = _total(b) / _total(o)
                    S.append({"quantity": f"{label}, {o['method']}", "ours_s": _total(o), "baseline": b["name"],
                              "baseline_s": _total(b), "speedup": sp, "target": "speedup >= 2", "met": sp >= 2})
        elif base:
            b = min(base, key=_total)
            sp = _total(b) / _total(fastest_ours)
            S.append({"quantity": label, "ours_s": _total(fastest_ours), "baseline": b["name"],
                      "baseline_s": _total(b), "speedup": sp, "target": "speedup >= 2", "met": sp >= 2})


def _f(v, spec=".2f", width=8) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    if isinstance(v, float) and math.isinf(v):
        return f"{'inf':>{width}}"
    if spec.startswith("+"):
        return f"{v:>+{width}{spec[1:]}}"
    return f"{v:>{width}{spec}}"


def _status(r) -> str:
    return "" if _ok(r) else f"{r['status']}: {r.get('message', '')}"


def print_report(rep: dict, args) -> None:
    env = rep["env"]
    print(f"threads={env['threads']} cpus={env['cpus']} torch={env['torch']} load avg at start="
          f"{env['load_avg_start'][0]:.2f}; resnet20_add, {args.n} samples 3x{args.size}x{args.size}, eval mode, "
          f"mean cross-entropy, float32; loss at the point {rep.get('fingerprint') or float('nan'):.6f} "
          f"(all workers agree: {rep['fingerprints_agree']}); watchdog {args.timeout_s:g} s / "
          f"{args.mem_cap_gib:g} GiB")
    for lib, info in rep["libraries"].items():
        print(f"  {lib}: " + (f"{info['version']} ({info['file']})" if "version" in info else f"skipped: {info['error']}"))
    if rep["hvp"]:
        print("\n1. One Hessian-vector product (best / median of "
              f"{args.hvp_repeats} after a warm-up; set-up = building the operator or graph)")
        print(f"{'library':<13} {'best s':>8} {'median s':>8} {'first s':>8} {'setup s':>8} {'peak MB':>8} "
              f"{'extra MB':>8} {'x ours':>7} {'vHv rel diff':>12}  notes")
        ref = next((r["vhv"] for r in rep["hvp"] if r["name"] == "floor_jvp" and _ok(r)), None)
        for r in rep["hvp"]:
            name = "ours (4-block)" if r["name"] == "ours_block4" else r["name"]
            note = "per vector of a vmapped block of 4" if r["name"] == "ours_block4" else _status(r)
            d = abs(r["vhv"] - ref) / abs(ref) if _ok(r) and ref else None
            print(f"{name:<13} {_f(r.get('best_s'), '.3f')} {_f(r.get('median_s'), '.3f')} "
                  f"{_f(r.get('first_s'), '.3f')} {_f(r.get('setup_s'), '.2f')} {_f(r.get('peak_mb'), '.0f')} "
                  f"{_f(r.get('extra_mb'), '.0f')} {_f(r.get('x_ours'), '.2f', 7)} {_f(d, '.1e', 12)}  {note}")
    ref = rep["reference"]
    if ref:
        ev = ", ".join(f"{e:.6g}" for e in ref["eigenvalues"])
        print(f"\nreference (ours, tol {args.ref_tol:g}, {args.ref_dtype}): {ev}; converged={ref['converged']}, "
              f"max residual {max(ref['residuals']):.2e}, {ref['n_hvps']} HVPs, {ref['wall_s']:.0f} s")
    if rep["topk"]:
        print(f"\n2. Top-k eigenvalues at relative accuracy {args.rel_acc:g} (first rung of each ladder that "
              f"meets it; wall includes set-up)")
        print(f"{'k':>2} {'library':<12} {'setting':<24} {'wall s':>8} {'setup s':>7} {'HVPs':>5} {'peak MB':>8} "
              f"{'extra MB':>8} {'max rel err':>11} {'met':>4} {'x ours':>7}  ladder (setting: err, s)")
        for r in rep["topk"]:
            lad = "; ".join(f"{fmt_setting(g['setting'])}: " + (f"{g['err']:.1e}, {g['wall_s']:.0f}s"
                                                              if g["status"] == "ok" else g["status"])
                            for g in r["rungs"])
            print(f"{r['k']:>2} {r['lib']:<12} {fmt_setting(r['setting']):<24} {_f(r.get('wall_s'), '.1f')} "
                  f"{_f(r.get('setup_s'), '.1f', 7)} {_f(r.get('n_hvps'), 'd', 5)} {_f(r.get('peak_mb'), '.0f')} "
                  f"{_f(r.get('extra_mb'), '.0f')} {_f(r.get('err'), '.1e', 11)} {'yes' if r.get('met') else 'NO':>4} "
                  f"{_f(r.get('x_ours'), '.2f', 7)}  {lad} {_status(r)}")
    ex = rep["exact_small"]
    if ex:
        if _ok(ex):
            print(f"\n3a. Trace on tiny_add ({ex['P']} parameters, {args.small_n} samples 3x8x8): exact tr(H) = "
                  f"{ex['trace']:.6g} from the dense float64 Hessian ({ex['wall_s']:.0f} s; ||H||_F {ex['frobenius']:.4g}, "
                  f"lambda_max {ex['lambda_max']:.4g}); {args.small_seeds} estimates x {args.trace_matvecs} products each")
        else:
            print(f"\n3a. exact trace of the small model failed: {_status(ex)}")
        print(f"{'estimator':<24} {'RMS rel err':>11} {'bias rel':>9} {'sd rel':>8} {'mean stderr':>11} "
              f"{'RMS err/se':>10} {'|err|<=2se':>10} {'s/estimate':>10}  notes")
        for r in rep["trace_small"]:
            per = r["wall_s"] / args.small_seeds if _ok(r) else None
            note = _status(r) or ("no stderr returned" if _ok(r) and r.get("rms_z") is None else "")
            print(f"{r['name']:<24} {_f(r.get('rms_rel_err'), '.2e', 11)} {_f(r.get('bias_rel'), '+.1e', 9)} "
                  f"{_f(r.get('sd_rel'), '.1e')} {_f(r.get('mean_stderr_rel'), '.2e', 11)} {_f(r.get('rms_z'), '.2f', 10)} "
                  f"{_f(r.get('within_2se'), '.0%', 10)} {_f(per, '.2f', 10)}  {note}")
    if rep["trace"]:
        print(f"\n3b. Trace on resnet20_add, budget {args.trace_matvecs} products (wall includes set-up)")
        print(f"{'estimator':<36} {'wall s':>8} {'setup s':>7} {'HVPs':>5} {'s/HVP':>6} {'peak MB':>8} {'extra MB':>8} "
              f"{'estimate':>10} {'stderr':>9} {'x ours':>7}  notes")
        for r in rep["trace"]:
            per = r["wall_s"] / r["n_hvps"] if _ok(r) and r.get("n_hvps") else None
            print(f"{r['name']:<36} {_f(r.get('wall_s'), '.1f')} {_f(r.get('setup_s'), '.1f', 7)} "
                  f"{_f(r.get('n_hvps'), 'd', 5)} {_f(per, '.2f', 6)} {_f(r.get('peak_mb'), '.0f')} {_f(r.get('extra_mb'), '.0f')} "
                  f"{_f(r.get('estimate'), '.5g', 10)} {_f(r.get('stderr'), '.3g', 9)} {_f(r.get('x_ours'), '.2f', 7)}  "
                  f"{_status(r)}")
    if rep["density"]:
        print(f"\n4. Spectral density, SLQ {args.slq_probes} probes x {args.slq_steps} steps (wall includes set-up)")
        print(f"{'library':<12} {'wall s':>8} {'setup s':>7} {'HVPs':>5} {'s/HVP':>6} {'peak MB':>8} {'extra MB':>8} "
              f"{'top node':>9} {'vs lam_1':>8} {'x ours':>7}  notes")
        for r in rep["density"]:
            per = r["wall_s"] / r["n_hvps"] if _ok(r) and r.get("n_hvps") else None
            notes = "; ".join(r.get("notes", [])) if _ok(r) else ("crashed: " + _status(r))
            print(f"{r['name']:<12} {_f(r.get('wall_s'), '.1f')} {_f(r.get('setup_s'), '.1f', 7)} "
                  f"{_f(r.get('n_hvps'), 'd', 5)} {_f(per, '.2f', 6)} {_f(r.get('peak_mb'), '.0f')} "
                  f"{_f(r.get('extra_mb'), '.0f')} {_f(r.get('top_node'), '.4g', 9)} "
                  f"{_f(r.get('top_node_rel_err'), '.1e')} {_f(r.get('x_ours'), '.2f', 7)}  {notes}")
    if rep["summary"]:
        print("\nSummary (ratio = fastest baseline / ours; targets: HVP within 1.3x of the floor, "
              ">= 2x the fastest library at equal accuracy)")
        for s in rep["summary"]:
            if "floor_s" in s:
                print(f"  {s['quantity']}: ours {s['ours_s']:.3f} s, floor {s['floor_s']:.3f} s, ours/floor "
                      f"{s['ratio']:.2f} [target <= 1.3: {'met' if s['met'] else 'not met'}]")
            elif "baseline" in s:
                tgt = f" [target >= 2x: {'met' if s['met'] else 'not met'}]" if "met" in s else ""
                extra = "" if s.get("ours_met", True) else " (ours did not reach the accuracy)"
                who = f" ({s['ours']})" if s.get("ours") else ""
                print(f"  {s['quantity']}: ours{who} {s['ours_s']:.2f} s, fastest baseline {s['baseline']} "
                      f"{s['baseline_s']:.2f} s: {s['speedup']:.2f}x{tgt}{extra}")
            else:
                print(f"  {s['quantity']}: ours {s['ours_s']:.2f} s; no baseline reached the accuracy")
    print(f"\ntotal {rep['total_s'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
