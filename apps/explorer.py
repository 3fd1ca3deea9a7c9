"""The explorer: a thin Streamlit view over the run store (``probe explore``).

Pages: Runs (table and training curves), one page per registered probe (its figure builder over
any selection of stored results), Compare (two runs, or the seeds of two recipes as mean +/- sd, on
every probe both have at the checkpoints picked, on shared axes), the seed's fusion table and Findings
(the experiments' stored numbers, drawn). Everything comes from the catalog under the runs root,
opened read-only; figures come from :mod:`probe.figures` and the probes' own builders; nothing
stored is executed, and stored text is shown as text.

    streamlit run apps/explorer.py -- --runs DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import streamlit as st

import probe
from probe.companions import load



def runs_root() -> str:
    """``--runs DIR`` after ``--`` on the streamlit command line, else ``$PROBE_RUNS`` / ``./runs``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return str(probe.resolve_runs_root(args.runs))


def catalog_stamp(root: str) -> tuple:
    """Changes whenever the catalog does (its file and its WAL): the key of every cached load."""
    out = []
    for suffix in ("", "-wal"):
        try:
            st_ = os.stat(os.path.join(root, "catalog.sqlite" + suffix))
            out.append((st_.st_mtime_ns, st_.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


@st.cache_data(show_spinner=False, max_entries=64)
def load_catalog(root: str, stamp: tuple) -> dict:
    store = probe.RunStore(root, readonly=True)
    runs = store.list_runs()
    skipped = list(store.skipped)
    probes = store.list_probes()
    skipped += store.skipped
    return {"runs": runs, "probes": probes, "skipped": skipped}


@st.cache_data(show_spinner=False, max_entries=16)
def load_findings(root: str, stamp: tuple) -> dict:
    store = probe.RunStore(root, readonly=True)
    return {"findings": store.list_findings(), "skipped": list(store.skipped)}


@st.cache_data(show_spinner=False, max_entries=256)
def load_metrics(root: str, run_id: str, stamp: tuple) -> list[dict]:
    return probe.RunStore(root, readonly=True).get_metrics(run_id)


@st.cache_resource(show_spinner=False, max_entries=512)
def load_result(root: str, probe_id: str):
    """A stored probe result (rows are immutable once written, so the id is the key)."""
    return probe.load_result(probe.RunStore(root, readonly=True), probe_id)


def _family(model: str) -> str:
    """The registry family of a model name ('' for a user factory or an unknown name; never imported)."""
    models = load("models")

    if models.is_factory_name(model):
        return "user factory"
    try:
        return models.model_entry(model).family
    except models.ModelNameError:
        return ""


def _run_label(run: dict) -> str:
    return f"{run['model']}  {run['run_id']}"


def _download(fig, name: str, key: str) -> None:
    st.download_button("download as HTML", fig.to_html(include_plotlyjs=True, full_html=True),
                       file_name=f"{name}.html", mime="text/html", key=key)


def _show(fig, name: str, key: str) -> None:
    st.plotly_chart(fig, width="stretch", key=f"chart-{key}")
    _download(fig, name, key=f"dl-{key}")


def _plain(text) -> str:
    """Stored text for a Streamlit element that reads markdown: one line, every markup character
    escaped, so it shows as written."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=^])", r"\\\1", " ".join(str(text).split()))


# --- pages -----------------------------------------------------------------------------------


def page_runs(root: str, cat: dict) -> None:
    st.header("Runs")
    runs = cat["runs"]
    if not runs:
        st.info(f"No runs in {root} yet: train one with `probe train --model mul_resnet --runs {root}` "
                "(or `probe demo`).")
        return
    seeds = {s.name: s.id for s in _seed_rows()}
    rows = []
    for r in runs:
        s = r.get("summary") or {}
        fusion = _run_fusion(r)
        rows.append({"run": r["run_id"], "model": r["model"], "family": _family(r["model"]), "fusion": fusion,
                     "seed row": seeds.get(fusion, ""), "seed": (r.get("config") or {}).get("seed"), "data": r["data"],
                     "status": r["status"], "epochs": s.get("epochs_done"), "best top-1": s.get("best_acc"),
                     "final top-1": s.get("final_acc"), "created": r["created_at"][:19]})
    models = sorted({r["model"] for r in rows})
    statuses = sorted({r["status"] for r in rows})
    c1, c2 = st.columns(2)
    pick_models = c1.multiselect("models", models, default=models, key="runs-models")
    pick_status = c2.multiselect("status", statuses, default=statuses, key="runs-status")
    shown = [r for r in rows if r["model"] in pick_models and r["status"] in pick_status]
    st.dataframe(shown, width="stretch", hide_index=True)
    for r in runs:
        if r["status"] == "failed" and r.get("error"):
            st.warning(f"run {r['run_id']} failed: {r['error']}")
    options = [r["run"] for r in shown]
    chosen = st.multiselect("training curves of", options, default=options[:2], key="runs-curves")
    if chosen:
        by_id = {r["run_id"]: r for r in runs}
        fig = probe.figures.training_curves([(by_id[i], load_metrics(root, i, catalog_stamp(root)))
                                             for i in chosen])
        _show(fig, "training_curves", "runs")


def _entry_label(row: dict) -> str:
    where = "init" if not row.get("checkpoint_epoch") else f"epoch {row['checkpoint_epoch']}"
    run = f" {row['run_id'][-6:]}" if row.get("run_id") else ""
    return f"{row['model']}{run} @ {where}  [{row['probe_id'][-8:]}]"


def _entries(root: str, rows: list[dict]) -> tuple[list, list[str]]:
    """(info, result) pairs for the figure builders; the rows whose artifact cannot be read are
    reported, not drawn."""
    entries, problems = [], []
    for row in rows:
        try:
            _, result = load_result(root, row["probe_id"])
        except probe.UserError as e:
            problems.append(f"probe {row['probe_id']}: {e}")
            continue
        info = {"model": row["model"], "run_id": row["run_id"], "epoch": row["checkpoint_epoch"],
                "probe_id": row["probe_id"]}
        entries.append((info, result))
    return entries, problems


def page_probe(root: str, cat: dict, name: str) -> None:
    spec = probe.get_probe(name)
    st.header(name)
    st.caption(spec.description or spec.help)
    rows = [p for p in cat["probes"] if p["kind"] == name and p["status"] == "finished"]
    if not rows:
        st.info(f"No {name} results in {root} yet: run `probe {name} --model NAME --runs {root}` or "
                f"`probe {name} --run RUN --checkpoint all --runs {root}`.")
        return
    labels = {_entry_label(r): r for r in rows}
    runs = sorted({r["run_id"] for r in rows if r["run_id"]})
    default = [lab for lab, r in labels.items() if runs and r["run_id"] == runs[-1]] or list(labels)[-1:]
    chosen = st.multiselect("results", list(labels), default=default, key=f"{name}-pick")
    entries, problems = _entries(root, [labels[c] for c in chosen])
    for msg in problems:
        st.error(msg)
    if not entries:
        return
    if spec.figure is not None:
        _show(spec.figure(entries), name, name)
    for i, fig in enumerate(spec.extra_figures):
        st.subheader(fig.title)
        if fig.series:
            st.caption("across training: one point per chosen checkpoint of a run")
        _show(fig.build(entries), f"{name}_{i}", f"{name}-extra-{i}")
    with st.expander("summaries"):
        for info, result in entries:
            st.text(f"{info['model']} @ {info['epoch']}\n{result.text()}")


#: summary numbers that describe the setting or the cost of a probe, not what it measured: hidden on
#: Compare unless asked for (matched on the last part of a dotted key)
_BOOKKEEPING = frozenset({
    "epoch", "checkpoint_epoch", "seed", "signal_seeds", "n", "n1", "n2", "n_params", "n_samples", "n_outputs",
    "n_gates", "n_points", "n_blocks", "n_chunks", "n_matvecs", "n_hvps", "n_passes", "n_same", "n_different",
    "numel", "dim", "k", "depth", "dims", "batch_size", "sample_batch", "vmap_batch", "chunk_points", "block_vectors",
    "subspace_dim", "resumed_chunks", "pairs", "triples", "steps", "plane_resolution", "bins", "threshold", "tol",
    "trials", "wall_time_s", "peak_memory_bytes", "est_gflop"})


def _numbers(d, prefix: str = "", depth: int = 0) -> dict:
    """Scalar numbers of a summary, flattened to dotted keys (two levels)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and (not isinstance(v, float) or math.isfinite(v)):
            out[key] = v
        elif isinstance(v, dict) and depth < 1:
            out.update(_numbers(v, key + ".", depth + 1))
    return out


def _is_bookkeeping(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _BOOKKEEPING


@st.cache_data(show_spinner=False, max_entries=512)
def _default_fusion(model: str) -> str:
    """The fusion a registered model is built with by default, by canonical name (several joined by
    ', '; '' for none, a user factory or an unknown name, which are never imported). Built on the meta
    device: no memory, no initialisation."""
    import torch

    models = load("models")
    if models.is_factory_name(model):
        return ""
    try:
        models.model_entry(model)
        with torch.device("meta"):
            net = models.create_model(model)
    except (models.ModelNameError, models.ModelConfigError, ValueError, TypeError, RuntimeError):
        return ""
    return ", ".join(sorted({m.spec.name for m in net.modules() if isinstance(m, models.Fusion)}))


@st.cache_data(show_spinner=False, max_entries=512)
def _canonical_fusion(text: str) -> str:
    """A stored fusion (a spec, a seed row id, add or mul) by its canonical name; parsed as data, and
    kept as written when it does not parse."""
    models = load("models")
    try:
        return models.resolve_fusion(text).name
    except (models.FusionSpecError, ValueError, TypeError):
        return text


def _run_fusion(run: dict) -> str:
    """The fusion a run was trained with: the one it was given, else its registered model's own."""
    cfg = run.get("config") or {}
    given = (((cfg.get("resolved") or {}).get("model") or {}).get("kwargs") or {}).get("fusion") or cfg.get("fusion")
    if isinstance(given, str) and given:
        return _canonical_fusion(given)
    return _default_fusion(run["model"]) if isinstance(run.get("model"), str) else ""


#: config fields that do not make a different recipe: runs equal in everything else are seeds of one
_NOT_THE_RECIPE = ("seed", "resolved", "device", "data_root")


def _recipe(run: dict) -> str:
    cfg = {k: v for k, v in (run.get("config") or {}).items() if k not in _NOT_THE_RECIPE}
    return json.dumps({"model": run.get("model"), "data": run.get("data"), **cfg}, sort_keys=True, default=str)


def _seed_group(run: dict, runs: list[dict]) -> list[dict]:
    """``run`` and the other finished runs of its recipe (the same config but the seed), by seed."""
    key = _recipe(run)
    others = [r for r in runs if r["run_id"] != run["run_id"] and r["status"] == "finished" and _recipe(r) == key]
    def by_seed(r: dict) -> tuple:
        seed = (r.get("config") or {}).get("seed")
        return (not isinstance(seed, int), seed if isinstance(seed, int) else 0, str(seed))

    return [run, *sorted(others, key=by_seed)]


def _seeds_text(group: list[dict]) -> str:
    seeds = [str((r.get("config") or {}).get("seed")) for r in group]
    return f"{len(group)} run(s), seed {', '.join(seeds)}"


def _epoch_label(epoch) -> str:
    return "init" if not epoch else f"epoch {epoch}"


def _rows_at(cat: dict, group: list[dict], kind: str, epoch: int) -> list[dict]:
    """The newest finished row of ``kind`` at checkpoint ``epoch`` of each run in ``group`` (runs
    without one are left out)."""
    out = []
    for run in group:
        found = [p for p in cat["probes"] if p["run_id"] == run["run_id"] and p["kind"] == kind
                 and p["status"] == "finished" and (p.get("checkpoint_epoch") or 0) == epoch]
        if found:
            out.append(found[-1])  # the catalog lists oldest first
    return out


def _probed_epochs(cat: dict, run: dict) -> list[int]:
    return sorted({p.get("checkpoint_epoch") or 0 for p in cat["probes"]
                   if p["run_id"] == run["run_id"] and p["status"] == "finished"})


def _side(values: list[dict], key: str) -> tuple:
    from probe.figures.seeds import mean_sd

    return mean_sd([v.get(key) for v in values])


def page_compare(root: str, cat: dict) -> None:
    st.header("Compare")
    runs = cat["runs"]
    if len(runs) < 2:
        st.info("Compare needs two runs in the catalog (e.g. `probe demo` trains add_resnet and mul_resnet).")
        return
    labels = {_run_label(r): r for r in runs}
    names = list(labels)
    c1, c2 = st.columns(2)
    a = labels[c1.selectbox("run A", names, index=min(1, len(names) - 1), key="cmp-a")]
    b = labels[c2.selectbox("run B", names, index=0, key="cmp-b")]
    o1, o2 = st.columns(2)
    pooled = o1.checkbox("mean +/- sd over seeds (the finished runs with the same config but the seed)",
                         key="cmp-seeds")
    bookkeeping = o2.checkbox("show bookkeeping rows (epoch, sizes, settings, time)", key="cmp-bookkeeping")
    group_a = _seed_group(a, runs) if pooled else [a]
    group_b = _seed_group(b, runs) if pooled else [b]
    if pooled:
        st.caption(f"A: {_seeds_text(group_a)}; B: {_seeds_text(group_b)}")
        if _recipe(a) == _recipe(b):
            st.warning("A and B are seeds of the same recipe: both sides pool the same runs.")
    stamp = catalog_stamp(root)
    if pooled:
        from probe.figures.seeds import seed_band_curves

        fig = seed_band_curves([(f"A {a['model']}", [load_metrics(root, r["run_id"], stamp) for r in group_a]),
                                (f"B {b['model']}", [load_metrics(root, r["run_id"], stamp) for r in group_b])])
    else:
        fig = probe.figures.training_curves([(a, load_metrics(root, a["run_id"], stamp)),
                                             (b, load_metrics(root, b["run_id"], stamp))])
    _show(fig, "compare_training", "cmp-train")

    epochs_a, epochs_b = _probed_epochs(cat, a), _probed_epochs(cat, b)
    if not epochs_a or not epochs_b:
        st.info("The two runs have no probe in common yet: run e.g. `probe ntk --run RUN` on both.")
        return
    k1, k2 = st.columns(2)
    ep_a = k1.selectbox("checkpoint of A", epochs_a, index=len(epochs_a) - 1, format_func=_epoch_label,
                        key="cmp-ckpt-a")
    ep_b = k2.selectbox("checkpoint of B", epochs_b, index=len(epochs_b) - 1, format_func=_epoch_label,
                        key="cmp-ckpt-b")
    kinds = [k for k in probe.list_probes() if _rows_at(cat, [a], k, ep_a) and _rows_at(cat, [b], k, ep_b)]
    if not kinds:
        st.info(f"No probe was run on both A at {_epoch_label(ep_a)} and B at {_epoch_label(ep_b)}: pick other "
                "checkpoints, or run e.g. `probe ntk --run RUN --checkpoint all` on both.")
    st.caption("Numbers flagged where A and B differ by more than 5%" +
               (" and by more than their two standard deviations together." if pooled else ".") +
               " Each probe's figure draws A and B on shared axes.")
    for kind in kinds:
        st.subheader(kind)
        rows_a, rows_b = _rows_at(cat, group_a, kind, ep_a), _rows_at(cat, group_b, kind, ep_b)
        na, nb = [_numbers(r["summary"]) for r in rows_a], [_numbers(r["summary"]) for r in rows_b]
        keys = set.intersection(*(set(n) for n in na + nb))
        table = []
        for key in sorted(keys):
            if not bookkeeping and _is_bookkeeping(key):
                continue
            (x, sx, nx), (y, sy, ny) = _side(na, key), _side(nb, key)
            if x is None or y is None:
                continue
            rel = abs(x - y) / max(abs(x), abs(y)) if max(abs(x), abs(y)) > 0 else 0.0
            beyond = not pooled or abs(y - x) > (sx or 0.0) + (sy or 0.0)
            row = {"quantity": key, "A": x, "B": y, "B - A": y - x}
            if pooled:
                row.update({"sd A": sx, "sd B": sy, "n A": nx, "n B": ny})
            row["differs"] = "yes" if rel > 0.05 and beyond else ""
            table.append(row)
        if table:
            import pandas as pd

            frame = pd.DataFrame(table)
            styled = frame.style.apply(
                lambda row: ["background-color: #fde2e1" if row["differs"] else "" for _ in row], axis=1)
            st.dataframe(styled, width="stretch", hide_index=True)
        spec = probe.get_probe(kind)
        entries, problems = _entries(root, rows_a + rows_b)
        for msg in problems:
            st.error(msg)
        if spec.figure is not None and entries:
            _show(spec.figure(entries), f"compare_{kind}", f"cmp-{kind}")


def _seed_rows():
    SEED_FUSIONS = load("models").SEED_FUSIONS

    return SEED_FUSIONS


def page_seed(root: str, cat: dict) -> None:
    st.header("Seed table")
    st.caption("The seed's fusion variants (WRN-16-10, Caltech-101 64x64, best test top-1) next to every run in "
               "the catalog that used the same fusion: the one it was trained with (--fusion) or, for a registered "
               "model such as add_resnet (fmm01) and mul_resnet (fmm18), the one the model is built with.")
    by_fusion: dict = {}
    for r in cat["runs"]:
        fusion = _run_fusion(r)
        if fusion:
            by_fusion.setdefault(fusion, []).append(r)
    rows = []
    for s in _seed_rows():
        mine = by_fusion.get(s.name, [])
        best = [x["summary"].get("best_acc") for x in mine if (x.get("summary") or {}).get("best_acc") is not None]
        rows.append({"id": s.id, "group": s.group, "formula": s.formula, "Caltech-101 top-1": s.caltech101_top1,
                     "runs here": len(mine), "best top-1 here": max(best) if best else None,
                     "models": ", ".join(sorted({x["model"] for x in mine}))})
    st.dataframe(rows, width="stretch", hide_index=True)


def _frame(rows: list[dict]):
    """A table of rows for st.dataframe: a column mixing text with other values (e.g. a depth that
    is a number or ``all``) becomes text."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for col in frame.columns:
        values = [v for v in frame[col] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if any(isinstance(v, str) for v in values) and not all(isinstance(v, str) for v in values):
            frame[col] = [None if v is None else str(v) for v in frame[col]]
    return frame


def _finding(finding: dict) -> None:
    """One stored finding: its title, figures and tables, or one line saying why it is not drawn."""
    from probe.figures.findings import FINDING_KINDS, finding_figures, finding_tables, validate_finding

    payload, fid = finding.get("payload"), finding["finding_id"]
    title = payload.get("title") if isinstance(payload, dict) else None
    kind = payload.get("kind") if isinstance(payload, dict) else None
    st.subheader(_plain(title if isinstance(title, str) and title.strip() else finding["name"]))
    st.caption(_plain(f"{finding['experiment']} / {finding['name']} ({kind or 'no kind'}), saved "
                      f"{str(finding['created_at'])[:19]}, id {fid}"))
    if finding.get("error"):
        st.error(_plain(finding["error"]))
        return
    where = f"finding {finding['experiment']}/{finding['name']} ({fid})"
    if kind not in FINDING_KINDS:
        st.warning(_plain(f"{where}: unknown kind {kind!r}; this explorer draws {', '.join(FINDING_KINDS)}"))
        return
    problem = validate_finding(payload)
    if problem:
        st.error(_plain(f"{where} is malformed: {problem}"))
        return
    if kind == "verdict":
        st.caption(_plain(f"baseline {payload['baseline']}"))
        st.markdown(_plain(payload["paragraph"]))
    try:
        figures = finding_figures(payload)
    except Exception as e:  # noqa: BLE001 - one finding that cannot be drawn leaves the page standing
        st.error(_plain(f"{where}: its figure could not be built ({type(e).__name__}: {e})"))
        figures = []
    for i, fig in enumerate(figures):
        _show(fig, f"{fid}_{i}", f"finding-{fid}-{i}")
    for name, rows in finding_tables(payload):
        st.dataframe(_frame(rows), width="stretch", hide_index=True, key=f"table-{fid}-{name}")


def page_findings(root: str) -> None:
    st.header("Findings")
    data = load_findings(root, catalog_stamp(root))
    for msg in data["skipped"]:
        st.warning(_plain(msg))
    if not data["findings"]:
        st.info(f"No findings in {root} yet: the experiments store them; run "
                f"`python -m experiments regimes --quick --runs {root}` and "
                f"`python -m experiments fusion_table --quick --runs {root}`.")
        return
    st.caption("What the experiments found, drawn from the numbers they stored (the newest finding of each "
               "experiment and name).")
    by_experiment: dict[str, list[dict]] = {}
    for finding in data["findings"]:
        by_experiment.setdefault(finding["experiment"], []).append(finding)
    for experiment, findings in by_experiment.items():
        with st.expander(_plain(f"{experiment} ({len(findings)} finding{'s' if len(findings) > 1 else ''})"),
                         expanded=True):
            for finding in findings:
                _finding(finding)


def main() -> None:
    st.set_page_config(page_title="landscape-probe explorer", layout="wide")
    root = runs_root()
    st.sidebar.title("landscape-probe")
    st.sidebar.caption(f"runs root: {root}")
    pages = ["Runs", *probe.list_probes(), "Compare", "Seed table", "Findings"]
    page = st.sidebar.radio("page", pages, key="page")
    try:
        cat = load_catalog(root, catalog_stamp(root))
    except probe.UserError as e:
        st.error(str(e))
        return
    for msg in cat["skipped"]:
        st.warning(msg)
    try:
        if page == "Runs":
            page_runs(root, cat)
        elif page == "Compare":
            page_compare(root, cat)
        elif page == "Seed table":
            page_seed(root, cat)
        elif page == "Findings":
            page_findings(root)
        else:
            page_probe(root, cat, page)
    except probe.UserError as e:
        st.error(str(e))


main()
