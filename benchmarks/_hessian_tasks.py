"""The tasks of ``benchmarks/bench_hessian.py``, each run in a fresh worker: one product, top-k
eigenvalues, trace estimates (on the benchmark's point and, against the exact trace, on a small
model), the small model's exact trace and the spectral density, all on the same seeded point
(model, batch, labels: :func:`make_point`, checked by its loss, :func:`fingerprint`).
"""
from __future__ import annotations

import gc
import math
import sys
import time

from benchmarks._harness import peak_memory_mib, print_ready, reset_peak, start_memory, status_kib, sync
from benchmarks._hessian_baselines import IMPORTS, SETUPS, Counter, flat_params, one_hvp

DEVICE = "cpu"            # the worker's device (its case's ``device``): the point and the seeded vectors


def make_point(case: dict):
    """(model, x, y) for ``case``: the registry's model through ``bench_ntk.build`` (BatchNorm
    statistics averaged over 256 random inputs, eval mode), seeded inputs and labels."""
    import torch
    from benchmarks.bench_ntk import build
    name, n, size = case["model"], case["n"], case["size"]
    model, x = build(name, n, size, in_chans=3, seed=case["seed"], device=case.get("device", "cpu"))
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(case["seed"] + 3)).to(x.device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, x, y


def fingerprint(model, x, y) -> float:
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y).double())


def seeded_vector(P: int, seed: int):
    import torch
    return torch.randn(P, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


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
            sync(DEVICE)
            t0 = time.perf_counter()
            h["mv"](V)
            sync(DEVICE)
            times.append((time.perf_counter() - t0) / block)
        else:
            w = seeded_vector(P, case["seed"] + 20 + r)
            sync(DEVICE)
            t0 = time.perf_counter()
            one_hvp(lib, h, w, model)
            sync(DEVICE)
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
        from probe import hessian_spectrum
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
        from probe import hutchinson_trace, hutchpp_trace
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
    H = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64, device=theta.device)
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
        from probe import slq_density
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
    global DEVICE
    if case.get("lib_dir"):
        sys.path.insert(0, case["lib_dir"])
    DEVICE = case.get("device", "cpu")
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
    base = status_kib("VmRSS")
    try:
        reset_peak()                                     # VmHWM := VmRSS
    except OSError:
        pass
    cuda = DEVICE != "cpu" and case["task"] != "import"
    gpu_base = start_memory(DEVICE) if cuda else None      # the CUDA allocator's peak counter starts here
    print_ready({"rss_base_kib": base, **out})
    counter = Counter()
    res = TASKS[case["task"]](case, model, x, y, counter)
    out.update(res, status="ok", rss_base_kib=base, rss_peak_kib=status_kib("VmHWM"))
    if cuda:
        out.update(gpu_base_mib=gpu_base, gpu_peak_mib=peak_memory_mib(DEVICE))
    return out
