"""The benchmarks' shared device flag and memory figures (benchmarks/_harness.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from benchmarks import _harness as harness

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_script_takes_the_device_flag():
    scripts = sorted(ROOT.glob("benchmarks/bench_*.py")) + [ROOT / "benchmarks" / "ntk_memory.py"]
    assert len(scripts) >= 10
    missing = [p.name for p in scripts if "add_device_flag(" not in p.read_text()]
    assert not missing, missing


def test_device_flag_defaults_to_cpu_and_takes_cuda_and_auto():
    p = argparse.ArgumentParser()
    harness.add_device_flag(p)
    assert p.parse_args([]).device == "cpu"
    assert p.parse_args(["--device", "auto"]).device == "auto"
    assert p.parse_args(["--device", "cuda"]).device == "cuda"
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "tpu"])


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.pick_device("cpu") == "cpu" and harness.pick_device("auto") == "cpu"
    with pytest.raises(SystemExit, match="no CUDA device"):
        harness.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert harness.pick_device("auto") == "cuda" and harness.pick_device("cuda") == "cuda"
    assert harness.memory_unit("cuda") == "CUDA allocated" and harness.memory_unit("cpu") == "max RSS"


def test_cpu_memory_is_the_resident_peak_as_before():
    assert harness.start_memory("cpu") == pytest.approx(harness.peak_rss_mib(), abs=1.0)
    big = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MiB touched
    now = harness.rss_mib()
    peak = harness.peak_memory_mib("cpu")
    del big
    assert peak == pytest.approx(harness.peak_rss_mib(), abs=1.0) and peak >= now - 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_is_the_allocators_peak_and_survives_a_meter():
    from probe.runtime.memory import MemoryMeter

    base = harness.start_memory("cuda")
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del big
    with MemoryMeter("cuda"):                               # resets the allocator's counter inside
        small = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        del small
    assert harness.peak_memory_mib("cuda") - base >= 256
