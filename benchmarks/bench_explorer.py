"""Explorer render times: a store of R runs x E checkpoints with every probe, each page rendered
cold (first run of the app, empty caches) and warm (a rerun), with ``streamlit.testing.v1.AppTest``;
plus the time of the catalog queries a page makes.

    python benchmarks/bench_explorer.py                   # 20 runs x 12 checkpoints
    python benchmarks/bench_explorer.py --runs 4 --epochs 3

Probes on every checkpoint: ntk and saturation; gradvar (the costliest) on init and the last
checkpoint unless ``--gradvar-all``. The store is built once under ``--root`` (default: a temp
folder) and reused when it exists; ``--device`` (cpu, cuda or auto) is where its runs train and its
probes run (the pages render on the host either way).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import probe  # noqa: E402
from benchmarks._harness import add_device_flag, pick_device  # noqa: E402

FAST = {"ntk": {"trials": 2}, "saturation": {"batch_size": 16},
        "gradvar": {"batches": 2, "batch_size": 4, "seeds": 2, "chunk": 16},
        "hessian": {"k": 3, "trace_matvecs": 12, "density_probes": 2, "density_steps": 12}}


def build(root: Path, runs: int, epochs: int, gradvar_all: bool, device: str = "cpu") -> None:
    store = probe.RunStore(root)
    if len(store.list_runs()) >= runs:
        return
    models = ("tiny_add", "tiny_mul")
    for i in range(runs):
        t0 = time.perf_counter()
        res = probe.train(probe.TrainConfig(model=models[i % 2], epochs=epochs, limit_train=64, limit_test=32,
                                            seed=i, schedule="constant", lr=0.05, device=device), store)
        for name in probe.list_probes():
            sweep = "all" if name != "gradvar" or gradvar_all else None
            targets = ["all"] if sweep else ["init", "last"]
            for ck in targets:
                probe.run_probe(store, name, FAST.get(name), run=res.run_id, checkpoint=ck, n=16, device=device)
        print(f"  built run {i + 1}/{runs} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def render(root: Path, page: str, warm_repeats: int) -> tuple[float, float, int]:
    import os

    from streamlit.testing.v1 import AppTest

    import streamlit as st

    os.environ["PROBE_RUNS"] = str(root)
    sys.argv = sys.argv[:1]  # the app reads --runs from the command line: not this script's flags
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "apps" / "explorer.py"), default_timeout=300)
    at.run()  # the Runs page, with the catalog load
    if page == "Runs":
        st.cache_data.clear()
        st.cache_resource.clear()
    t0 = time.perf_counter()
    at.sidebar.radio(key="page").set_value(page).run()  # cold: this page's loads not cached yet
    cold = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"page {page}: {at.exception}")
    headers = [h.value for h in at.header]
    if headers != [page]:
        raise RuntimeError(f"page {page} did not render (headers {headers})")
    charts = len(at.get("plotly_chart"))
    warm = []
    for _ in range(warm_repeats):
        t0 = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm), charts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="runs in the store (default 20)")
    ap.add_argument("--epochs", type=int, default=12, help="checkpoints per run (default 12)")
    ap.add_argument("--gradvar-all", action="store_true", help="gradvar on every checkpoint too")
    ap.add_argument("--root", default=None, help="store folder (default: a new temp folder)")
    ap.add_argument("--repeats", type=int, default=3, help="warm reruns per page (median reported)")
    add_device_flag(ap)
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-explorer-"))
    t0 = time.perf_counter()
    build(root, args.runs, args.epochs, args.gradvar_all, pick_device(args.device))
    store = probe.RunStore(root, readonly=True)
    t1 = time.perf_counter()
    runs, probes = store.list_runs(), store.list_probes()
    query = time.perf_counter() - t1
    print(f"store {root}: {len(runs)} runs, {len(probes)} probe rows (built in {t1 - t0:.0f}s); "
          f"catalog query (all runs + all probes) {query * 1000:.0f} ms")
    print(f"{'page':<12} {'cold s':>8} {'warm s':>8} {'charts':>7}")
    for page in ("Runs", *probe.list_probes(), "Compare", "Seed table"):
        cold, warm, charts = render(root, page, args.repeats)
        print(f"{page:<12} {cold:>8.2f} {warm:>8.2f} {charts:>7}")


if __name__ == "__main__":
    main()
