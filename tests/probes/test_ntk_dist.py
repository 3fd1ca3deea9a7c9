"""The NTK kernel under torchrun (gloo, two ranks started by the test) from per-rank layer factors:
equal to the single-process kernel in float64, on every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from torch import nn

from probe import empirical_ntk
from probe.probes.ntk._dist import _shares, _split
from probe.runtime.dist import Dist

ROOT = Path(__file__).resolve().parents[2]

MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        """Conv + BatchNorm (running statistics) at 8 x 8, a strided conv, a Linear applied at 16
        positions and called twice, a Linear head, a second head on the input: rows, Gram,
        summed-call paths and layers that some outputs do not reach."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.conv2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
            self.shared = nn.Linear(6, 6)
            self.fc = nn.Linear(6 * 16, 4)
            self.side = nn.Linear(3, 2)        # outputs 4, 5: no gradient reaches the other layers

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            h = torch.tanh(self.conv2(h)).permute(0, 2, 3, 1)          # (n, 4, 4, 6)
            h = self.shared(torch.tanh(self.shared(h)))
            return torch.cat([self.fc(h.reshape(h.shape[0], -1)), self.side(x.mean((2, 3)))], 1)


    def build(n=23):
        torch.manual_seed(0)
        m = Net().double()
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.2, 0.2)
            m.bn.running_var.uniform_(0.5, 1.5)
        return m.eval(), torch.randn(n, 3, 8, 8, dtype=torch.float64)
''')

# (kind, memory budget): the whole factors at once; 2 of the 6 outputs' factors at a time, with no
# room left to keep the own samples' patch matrices and Gram products (formed again per pass); a
# budget the factors do not fit (the tiles instead); 2 outputs at a time, those kept
RUNS = [("trace", 2 ** 30), ("diagonal", 1_750_000), ("trace", 1_000_000), ("diagonal", 1_895_000),
        ("diagonal", 2 ** 30)]
CHUNKS = {4: 5}         # run 4: passes over chunks of 5 samples (gradients copied into the share's buffers)

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from probe import empirical_ntk
    from probe.runtime.dist import setup, teardown
    from ntk_model import build

    import probe.probes.ntk._dist as dist_ntk

    ddp = setup("cpu")
    m, x = build()
    out = {}
    default_chunk, chunks = dist_ntk._CHUNK, json.loads(sys.argv[3])
    for i, (kind, budget) in enumerate(json.loads(sys.argv[2])):
        dist_ntk._CHUNK = chunks.get(str(i), default_chunk)
        r = empirical_ntk(m, x, kind=kind, memory_budget_bytes=budget)
        out[str(i)] = r.kernel
        if ddp.rank == 0:
            print(json.dumps({"schedule": r.schedule, "notes": list(r.notes)}), flush=True)
    np.savez(f"{sys.argv[1]}-{ddp.rank}.npz", **out)
    bad = x.clone()
    bad[20, 0, 0, 0] = float("nan")                  # in rank 1's share (samples 12..22)
    try:
        empirical_ntk(m, bad)
    except ValueError as e:
        sys.stdout.write(f"NONFINITE {ddp.rank}: {e}\\n")
        sys.stdout.flush()
    teardown()
''')


def test_rank_shares_are_the_process_groups_shards():
    for n, world in [(23, 2), (7, 3), (512, 2), (5, 4)]:
        got = _shares(n, world)
        want = [Dist(rank=r, world=world).shard(n) for r in range(world)]
        assert [slice(a, b) for a, b in got] == want


def test_cross_block_items_split_into_two_disjoint_halves_of_equal_cost():
    from probe.autodiff import StructuredLayer

    layers = [StructuredLayer(f"l{i}", nn.Identity(), "linear", "w", None, calls=1, p=p) for i, p in
              enumerate([1000, 10, 300, 300, 7])]
    items = {(o, li) for o in range(4) for li in range(len(layers))}
    halves = _split(items, layers, 1, 0)
    assert halves == _split(items, layers, 0, 1)                         # the same on both ranks
    assert halves[0] | halves[1] == items and not halves[0] & halves[1]
    load = [sum(layers[li].p for _, li in halves[r]) for r in (0, 1)]
    assert abs(load[0] - load[1]) <= 7


def test_ntk_from_layer_factors_over_two_ranks_equals_one_process(tmp_path):
    """Two ranks, 23 samples (shares of 12 and 11): the trace kernel, the diagonal kernel with
    the factors of 2 outputs at a time, and the tiles when the factors do not fit; each equal
    to the single-process kernel within 1e-10 (float64) and the same on both ranks. A
    non-finite output in one rank's share stops both ranks with the same error."""
    (tmp_path / "ntk_model.py").write_text(MODEL)
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}", OMP_NUM_THREADS="1",
               PROBE_DIST_TIMEOUT="120")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(tmp_path / "worker.py"), str(tmp_path / "k"), json.dumps(RUNS), json.dumps(CHUNKS)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(info) == len(RUNS)
    assert "exchanged 6 output(s) at a time" in info[0]["schedule"]
    assert "exchanged 2 output(s) at a time" in info[1]["schedule"] and "formed again" in info[1]["schedule"]
    assert "exchanged 2 output(s) at a time" in info[3]["schedule"] and "again" not in info[3]["schedule"]
    for r in (0, 1):        # each rank checked its share; both raise the same error, sample 20 named
        assert (f"NONFINITE {r}: model outputs are not finite on the probe inputs (x1, e.g. sample 20)"
                in proc.stdout), proc.stdout[-2000:]
    for run in info[:2] + info[3:]:
        assert any("from layer factors" in n for n in run["notes"])
    assert any("tiles over 2 ranks" in n and "do not apply or fit" in n for n in info[2]["notes"])

    sys.path.insert(0, str(tmp_path))
    try:
        from ntk_model import build
    finally:
        sys.path.remove(str(tmp_path))
    m, x = build()
    a, b = np.load(tmp_path / "k-0.npz"), np.load(tmp_path / "k-1.npz")
    for i, (kind, _) in enumerate(RUNS):
        want = empirical_ntk(m, x, kind=kind).kernel
        got = a[str(i)]
        assert got.shape == want.shape == ((23, 23) if kind == "trace" else (6, 23, 23))
        assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max(), (kind, i)
        assert np.array_equal(got, b[str(i)])
        if i != 2:                                # the factors' cross blocks are mirrored exactly
            assert np.array_equal(got, np.swapaxes(got, -1, -2))
