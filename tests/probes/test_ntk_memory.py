"""The NTK probe keeps to its memory budget: measured peak RSS of ``empirical_ntk`` on a wide MLP.

Each method runs in a fresh subprocess (this file run as a script): it first makes the same call
on a tiny MLP (the first call's lazy imports and initialisation, ~80 MB, are not the method's),
builds the wide model, reads VmRSS, resets the high-water mark (``5`` to /proc/self/clear_refs),
calls ``empirical_ntk(model, x, method=m, memory_budget_bytes=B)`` (B in BUDGETS, ~2x and ~4x
the model's bytes) and reads VmHWM. The call passes when extra = VmHWM - VmRSS <= B + the model's
bytes (one copy of the parameters is allowed on top of the budget) + SLACK (allocator and
temporaries), or when it refuses with a :class:`UserError` that names the budget -- except
``auto`` at ~4x the model's bytes, where the layerwise method (about two copies) fits. A parent-side watchdog kills a worker above KILL_ABOVE.
The kernel of every method that ran is checked against a float64 closed form of the MLP's trace
NTK (per layer (g_i . g_j)(h_i . h_j + 1), g the gradient at the layer output, h its input).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks._harness import status_kib
from benchmarks.ntk_memory import NtkMLP

WIDTH = 8192                     # 12 -> 8192 -> 8192 -> 10: 67.3 M parameters, 269 MB in float32
N = 8
MIB = 2 ** 20
BUDGETS = [512 * MIB, 1024 * MIB]  # ~2x and ~4x the model
SLACK = 64 * 2 ** 20
KILL_ABOVE = 6 * 2 ** 30         # resident set at which the watchdog stops a worker
TIMEOUT_S = 600


def _mlp(width: int, n: int, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = NtkMLP(12, width, 10).to(dtype).eval()        # 12 -> width -> width -> 10
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return model, x


def _reference_trace_ntk(model: NtkMLP, x: torch.Tensor) -> torch.Tensor:
    """The trace NTK in closed form, float64: a Linear layer's weight Jacobian at sample i is
    g_i h_i^T (g the gradient at its output, h its input), its bias Jacobian g_i."""
    hs, zs, a = [], [], x
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        hs.append(a.detach().double())
        z = layer(a)
        zs.append(z)
        a = z * layer.in_features ** -0.5
        if i < last:
            a = torch.relu(a)
    K = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for o in range(a.shape[1]):
        gs = torch.autograd.grad(a[:, o].sum(), zs, retain_graph=o < a.shape[1] - 1)
        for h, g in zip(hs, gs):
            g = g.double()
            K += (g @ g.T) * (h @ h.T + 1.0)
    return K


def _worker(method: str, width: int, n: int, budget: int) -> dict:
    from probe.errors import UserError
    from probe.probes.ntk import empirical_ntk
    try:                                                  # warm-up: one-time costs of a first call
        empirical_ntk(*_mlp(16, 2), method=method, memory_budget_bytes=budget)
    except UserError:
        pass
    model, x = _mlp(width, n)
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = {"model_bytes": model_bytes}
    t0 = time.perf_counter()
    try:
        res = empirical_ntk(model, x, kind="trace", method=method, memory_budget_bytes=budget)
        out.update(status="ok", method_used=res.method, planned=int(res.peak_memory_bytes))
    except UserError as e:
        res = None
        out.update(status="refused", message=str(e))
    out["wall_s"] = time.perf_counter() - t0
    out["extra"] = (status_kib("VmHWM") - base) * 1024
    if res is not None:
        with torch.enable_grad():
            ref = _reference_trace_ntk(model, x)
        K = torch.from_numpy(res.kernel)
        out["rel_err"] = float((K - ref).abs().max() / ref.abs().max())
    return out


def _run(method: str, budget: int, width: int = WIDTH, n: int = N) -> dict:
    """``_worker`` in a fresh subprocess, under an RSS watchdog."""
    cmd = [sys.executable, str(Path(__file__).resolve()), json.dumps([method, width, n, budget])]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0, why = time.monotonic(), None
    while proc.poll() is None:
        rss = status_kib("VmRSS", str(proc.pid))
        if rss is not None and rss * 1024 > KILL_ABOVE:
            why = f"killed: resident set above {KILL_ABOVE / 2 ** 30:g} GiB"
        elif time.monotonic() - t0 > TIMEOUT_S:
            why = f"killed after {TIMEOUT_S} s"
        if why:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if why:
        pytest.fail(f"method={method}: {why}")
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b // MIB}MiB")
@pytest.mark.parametrize("method", ["auto", "layerwise", "jacobian", "ntvp"])
def test_peak_rss_within_budget(method, budget):
    r = _run(method, budget)
    if r["status"] == "refused":
        assert "memory_budget_bytes" in r["message"] or "budget" in r["message"], r["message"]
        # ~4x the model's bytes is enough for the layerwise kernel (about two copies of the model)
        assert not (method == "auto" and budget >= 4 * r["model_bytes"]), (
            f"method='auto' refused a budget of {budget / MIB:.0f} MiB for a "
            f"{r['model_bytes'] / MIB:.0f} MiB model: {r['message']}")
        return
    limit = budget + r["model_bytes"] + SLACK
    assert r["extra"] <= limit, (
        f"method={method} (ran {r['method_used']}): extra peak RSS {r['extra'] / MIB:.0f} MiB > "
        f"budget {budget / MIB:.0f} + model {r['model_bytes'] / MIB:.0f} + slack {SLACK / MIB:.0f} MiB "
        f"(planned {r['planned'] / MIB:.0f} MiB, {r['wall_s']:.1f} s)")
    assert r["rel_err"] < 1e-4, f"method={method}: kernel differs from the closed form by {r['rel_err']:.2e}"


def test_auto_matches_jacobian_and_closed_form(one_thread):
    """On a narrow float64 MLP with a generous budget: auto (layerwise) = jacobian = closed form."""
    from probe.probes.ntk import empirical_ntk
    model, x = _mlp(96, 6, dtype=torch.float64)
    auto = empirical_ntk(model, x, method="auto", memory_budget_bytes=2 ** 30)
    jac = empirical_ntk(model, x, method="jacobian", memory_budget_bytes=2 ** 30)
    with torch.enable_grad():
        ref = _reference_trace_ntk(model, x).numpy()
    scale = abs(ref).max()
    assert auto.method == "layerwise"
    assert abs(auto.kernel - ref).max() <= 1e-10 * scale
    assert abs(jac.kernel - ref).max() <= 1e-10 * scale


if __name__ == "__main__":
    print(json.dumps(_worker(*json.loads(sys.argv[1]))))
