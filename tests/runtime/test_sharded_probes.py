"""Saturation and gradient variance under torchrun (gloo, world size 2): each rank computes the
sums of its share of the inputs / mini-batches / per-sample gradients / signal-propagation chunks, the ranks' moments are
merged, and the result equals the same call as one process (the call inside ``local()`` on each
rank), in float64: counts, histograms and used/non-finite tallies exactly, means and deviations
within rtol 1e-12 (saturation) and 1e-10 (gradient variance: sums of squared gradient norms)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

SCRIPT = r"""
import math
import numpy as np
import torch
import models
from probe.runtime.dist import local, setup, teardown
from probe.probes.gradvar import GradVarParams, gradient_variance
from probe.probes.saturation.api import saturation

d = setup("cpu")
assert d.world == 2
torch.manual_seed(0)
sat_model = models.create_model("tiny_triplet").double()
x = torch.randn(21, 1, 8, 8, dtype=torch.float64) * 3
x[4, 0, 3, 3] = math.nan                              # rank 0's share holds a non-finite input
with local():
    one = saturation(sat_model, x, batch_size=4)
seen = []
shared = saturation(sat_model, x, batch_size=4, progress=lambda *a: seen.append(a))
assert seen[-1][2] == (11 if d.rank == 0 else 10), seen   # this rank's share only
assert one.names.tolist() == shared.names.tolist() and one.unused == shared.unused and one.nonfinite.sum() > 0
assert shared.n_samples == 21
for k in ("count", "nonfinite", "n_logit_sat", "n_output_sat", "hist"):
    assert np.array_equal(getattr(one, k), getattr(shared, k)), k
for k in ("gain", "mean", "std"):
    np.testing.assert_allclose(getattr(shared, k), getattr(one, k), rtol=1e-12, atol=1e-14, err_msg=k)

gv_model = models.create_model("tiny_add").double()
xg, yg = torch.randn(40, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (40,))
for bn, share in (("eval", {"gradvar: mini-batch gradients": 3 - d.rank, "gradvar: per-sample gradients": 20}),
                  ("train", {"gradvar: mini-batch gradients": 3 - d.rank, "gradvar: per-sample gradients": 24 - 8 * d.rank})):
    p = GradVarParams(batches=5, batch_size=8, chunk=6, seeds=1, signal=False, dtype="float64", bn=bn)
    with local():
        a = gradient_variance(gv_model, xg, yg, p)
    last = {}
    b = gradient_variance(gv_model, xg, yg, p, progress=lambda desc, done, total: last.__setitem__(desc, total))
    assert last == share, (bn, last)                  # 5 batches split 3 / 2; 40 samples 20 / 20, 5 groups 3 / 2
    for k in ("grad_norm", "trace_cov", "batch_grad_rms", "per_sample_var", "per_sample_grad_norm"):
        assert np.isfinite(getattr(a, k)).all() and (getattr(a, k) > 0).any(), (bn, k)
    for k in ("grad_norm", "trace_cov", "batch_grad_rms", "snr", "noise_scale", "per_sample_var",
              "per_sample_grad_norm", "noise_scale_ps", "rel_update"):   # (rel_update: NaN for zero weights)
        np.testing.assert_allclose(getattr(b, k), getattr(a, k), rtol=1e-10, atol=0, err_msg=f"{bn} {k}")
    for k in ("batches_used", "samples_used", "nonfinite_batches", "nonfinite_samples"):
        assert getattr(a, k) == getattr(b, k), (bn, k)
    assert np.array_equal(a.nonfinite, b.nonfinite)
    assert "mini-batch and per-sample gradients shared out over 2 rank(s), their moments merged" in b.notes
    assert not any("shared out" in n for n in a.notes)
from probe.probes.gradvar import signal_propagation
for bn in ("eval", "train"):                        # 40 samples: chunks of 6 (7 of them), groups of 8
    kw = dict(rebuild=lambda s: models.create_model("tiny_add").double(), seeds=(0, 1), bn=bn, chunk=6,
              batch_size=8, dtype="float64")
    with local():
        a = signal_propagation(gv_model, xg, yg, **kw)
    b = signal_propagation(gv_model, xg, yg, **kw)
    assert a.block_names == b.block_names and a.act_var.shape == (2, len(a.block_names)) and a.seeds == b.seeds
    assert np.isfinite(a.act_var).all() and (a.grad_norm > 0).all(), bn
    np.testing.assert_allclose(b.act_var, a.act_var, rtol=1e-10, atol=0, err_msg=f"signal {bn} act_var")
    np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-10, atol=0, err_msg=f"signal {bn} grad_norm")
    assert (a.ranks, b.ranks) == (0, 2)
    with local():
        one = signal_propagation(gv_model, xg, yg, bn=bn, chunk=6, dtype="float64")
    two = signal_propagation(gv_model, xg, yg, bn=bn, chunk=6, dtype="float64")
    np.testing.assert_allclose(two.act_var, one.act_var, rtol=1e-10, atol=0, err_msg=f"given model {bn}")
    np.testing.assert_allclose(two.grad_norm, one.grad_norm, rtol=1e-10, atol=0, err_msg=f"given model {bn}")
p = GradVarParams(batches=3, batch_size=8, chunk=6, seeds=1, signal=True, per_sample=False, dtype="float64")
b = gradient_variance(gv_model, xg, yg, p)
assert "mini-batch and signal-propagation gradients shared out over 2 rank(s), their moments merged" in b.notes, b.notes
print(f"RANK {d.rank} OF {d.world} EQUAL", flush=True)
teardown()
"""


def test_saturation_and_gradient_variance_over_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PROBE_DIST_TIMEOUT="60")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANK 0 OF 2 EQUAL" in proc.stdout and "RANK 1 OF 2 EQUAL" in proc.stdout
