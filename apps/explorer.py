"""The explorer: a thin Streamlit view over the run store (``probe explore``).

Pages: Runs (table and training curves), one page per registered probe (its figure builder over
any selection of stored results), Compare (two runs side by side on every probe both have), the
seed's fusion table and Findings (the experiments' stored numbers, drawn). Everything comes from
the catalog under the runs root, opened read-only; figures come from :mod:`probe.figures` and the
probes' own builders; nothing stored is executed, and stored text is shown as text.

    streamlit run apps/explorer.py -- --runs DIR
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

import streamlit as st

import probe



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
    import models

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
        cfg, s = r.get("config") or {}, r.get("summary") or {}
        fusion = (((cfg.get("resolved") or {}).get("model") or {}).get("kwargs") or {}).get("fusion") \
            or cfg.get("fusion")
        rows.append({"run": r["run_id"], "model": r["model"], "family": _family(r["model"]), "fusion": fusion or "",
                     "seed row": seeds.get(fusion, "") if isinstance(fusion, str) else "", "data": r["data"],
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
    stamp = catalog_stamp(root)
    fig = probe.figures.training_curves([(a, load_metrics(root, a["run_id"], stamp)),
                                         (b, load_metrics(root, b["run_id"], stamp))])
    _show(fig, "compare_training", "cmp-train")
    latest: dict = {}
    for p in cat["probes"]:
        if p["run_id"] in (a["run_id"], b["run_id"]) and p["status"] == "finished":
            latest[(p["run_id"], p["kind"])] = p  # newest last: the catalog lists oldest first
    kinds = sorted({k for (_, k) in latest if (a["run_id"], k) in latest and (b["run_id"], k) in latest})
    if not kinds:
        st.info("The two runs have no probe in common yet: run e.g. `probe ntk --run RUN` on both.")
    for kind in kinds:
        st.subheader(kind)
        ra, rb = latest[(a["run_id"], kind)], latest[(b["run_id"], kind)]
        na, nb = _numbers(ra["summary"]), _numbers(rb["summary"])
        table = []
        for key in sorted(set(na) & set(nb)):
            x, y = na[key], nb[key]
            rel = abs(x - y) / max(abs(x), abs(y)) if max(abs(x), abs(y)) > 0 else 0.0
            table.append({"quantity": key, "A": x, "B": y, "B - A": y - x, "differs": "yes" if rel > 0.05 else ""})
        if table:
            import pandas as pd

            frame = pd.DataFrame(table)
            styled = frame.style.apply(
                lambda row: ["background-color: #fde2e1" if row["differs"] else "" for _ in row], axis=1)
            st.dataframe(styled, width="stretch", hide_index=True)
        spec = probe.get_probe(kind)
        entries, problems = _entries(root, [ra, rb])
        for msg in problems:
            st.error(msg)
        if spec.figure is not None and len(entries) == 2:
            cols = st.columns(2)
            for col, entry, tag in zip(cols, entries, ("a", "b")):
                with col:
                    _show(spec.figure([entry]), f"{kind}_{tag}", f"cmp-{kind}-{tag}")


def _seed_rows():
    from models import SEED_FUSIONS

    return SEED_FUSIONS


def page_seed(root: str, cat: dict) -> None:
    st.header("Seed table")
    st.caption("The seed's fusion variants (WRN-16-10, Caltech-101 64x64, best test top-1) next to every run in "
               "the catalog that used the same fusion.")
    by_fusion: dict = {}
    for r in cat["runs"]:
        cfg = r.get("config") or {}
        fusion = (((cfg.get("resolved") or {}).get("model") or {}).get("kwargs") or {}).get("fusion")
        if isinstance(fusion, str):
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
