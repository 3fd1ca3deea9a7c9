"""Partial results: pieces saved by one attempt are found by the next attempt of the same job
only, unreadable pieces are recomputed (noted), and the runner removes them with the result."""
from __future__ import annotations

import os

import numpy as np
import pytest

from probe.runtime.partial import PartialResults, model_fingerprint, partial_key
from probe.store import RunStore


def test_pieces_round_trip_and_are_keyed_by_the_job(tmp_path):
    store = RunStore(tmp_path)
    a = PartialResults(store, partial_key({"probe": "surface", "params": {"grid": "-1:1:5"}}))
    assert a.get("chunk-0") is None
    a.put("chunk-0", {"loss": np.array([1.0, np.nan, 3.0]), "i": np.arange(3)})
    again = PartialResults(store, partial_key({"params": {"grid": "-1:1:5"}, "probe": "surface"}))  # key order
    got = again.get("chunk-0")
    assert np.array_equal(got["loss"], [1.0, np.nan, 3.0], equal_nan=True) and got["loss"].dtype == np.float64
    assert again.resumed == 1
    other = PartialResults(store, partial_key({"probe": "surface", "params": {"grid": "-1:1:7"}}))
    assert other.get("chunk-0") is None
    again.clear()
    assert PartialResults(store, a.key).get("chunk-0") is None


def test_an_unreadable_piece_is_recomputed_with_a_note(tmp_path):
    store = RunStore(tmp_path)
    p = PartialResults(store, partial_key({"job": 1}))
    p.put("c0", {"x": np.ones(4)})
    path = tmp_path / "partial" / p.key / "c0.npz"
    path.write_bytes(path.read_bytes()[:20])                     # truncated
    q = PartialResults(store, p.key)
    assert q.get("c0") is None and "c0" in q.notes[0] and "recomputed" in q.notes[0]


def test_a_symlink_out_of_the_root_is_not_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    store = RunStore(root)
    p = PartialResults(store, partial_key({"job": 2}))
    (root / "partial").mkdir()
    os.symlink(outside, root / "partial" / p.key)
    with pytest.raises(Exception, match="outside the runs root"):
        p.put("c0", {"x": np.ones(2)})
    assert p.get("c0") is None and not list(outside.iterdir())


def test_bad_piece_names_are_refused(tmp_path):
    p = PartialResults(RunStore(tmp_path), partial_key({"job": 3}))
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            p.put(bad, {"x": np.ones(1)})


def test_the_fingerprint_sees_every_parameter_and_buffer():
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    f0 = model_fingerprint(m)
    with torch.no_grad():
        m[1].running_mean += 1e-7
    assert model_fingerprint(m) != f0


def test_the_runner_hands_out_a_partial_store_and_clears_it(tmp_path, monkeypatch):
    from probe.jobs import run_probe
    from probe.probes import registry
    from tests.probes.test_registry import ToyParams, ToyResult, _toy_compute

    seen = []

    def compute(ctx, p):
        seen.append(ctx.partial)
        if ctx.partial is not None:
            ctx.partial.put("piece", {"v": np.arange(2)})
        return _toy_compute(ctx, p)

    spec = registry.register(registry.Probe(name="toy_partial", help="t", params=ToyParams, result=ToyResult,
                                            compute=compute))
    try:
        store = RunStore(tmp_path)
        run_probe(store, "toy_partial", None, model="tiny_add", n=8)
        assert seen[0] is not None and not (tmp_path / "partial" / seen[0].key).exists()
        run_probe(store, "toy_partial", None, model="tiny_add", n=8, save=False)
        assert seen[1] is None                              # unsaved runs: nothing to resume into
    finally:
        registry._REGISTRY.pop(spec.name, None)
