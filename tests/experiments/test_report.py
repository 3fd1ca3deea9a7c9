"""The experiments' report page (one standalone HTML page from an output root, its files read as
data) and the experiment pages sharing one plotly.js file."""
from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

import plotly.graph_objects as go
import plotly.offline
import pytest

from experiments._common import Context, Outcome, write_outputs
from experiments.__main__ import main
from experiments.report import MAX_TABLE_ROWS, write_report
from probe.errors import UserError

#: A string of the plotly.js bundle that only the bundle itself holds.
BANNER = "plotly.js v"
XSS = "<script>alert(1)</script>"


def _bundle_size() -> int:
    return len(plotly.offline.get_plotlyjs().encode())


def _figure(title: str, y) -> go.Figure:
    return go.Figure(go.Scatter(x=list(range(len(y))), y=y, name=title), layout={"title": {"text": title}})


def _experiment(out, name, title, figures, *, found=(), tables=None, done=True, listed=True):
    folder = out / name
    folder.mkdir(parents=True)
    for stem, fig in figures.items():
        (folder / f"{stem}.json").write_text(fig if isinstance(fig, str) else fig.to_json())
    for stem, text in (tables or {}).items():
        (folder / f"{stem}.csv").write_text(text)
    meta = {"name": name, "title": title, "quick": True, "run_ids": ["r-1", "r-2"], "probe_ids": ["p-1"],
            "runs_root": "runs", "found": list(found), "wall_s": 83.4, "finished_at": "2026-01-02T03:04:05Z"}
    if listed:
        meta["figures"], meta["tables"] = list(figures), list(tables or {})
    (folder / "runs.json").write_text(json.dumps(meta))
    if done:
        (folder / "done.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def out(tmp_path):
    out = tmp_path / "out"
    _experiment(out, "pair_ntk", "NTK spectra of the pair", {"spectrum": _figure(f"spectrum {XSS}", [3.0, 2.0, 1.0])},
                found=["condition number 12 vs 340", f"a finding with {XSS} in it"],
                tables={"numbers": "model,run_id,lambda_max\nadd_resnet,r-1,3.5\nmul_resnet,r-2,<b>7</b>\n",
                        "correlations": "measure,rho\nsharpness,0.4\n"})
    _experiment(out, "pair_hessian", "Hessian of the pair",
                {"lambda_max": _figure("lambda max", [1.0, 4.0]), "broken": '{"data": [1, 2',
                 "not_a_figure": "[1, 2, 3]"},
                tables={"numbers": "model,x\n" + "".join(f"m,{i}\n" for i in range(MAX_TABLE_ROWS + 50))})
    return out


def test_report_is_one_standalone_page_with_every_experiment(out):
    page = write_report(out)
    assert page == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == ["pair_hessian", "pair_ntk", "report.html"]
    text = page.read_text()
    assert text.count(BANNER) == 1                                  # plotly.js embedded exactly once
    assert len(text.encode()) < 1.5 * _bundle_size()
    assert "NTK spectra of the pair" in text and "Hessian of the pair" in text
    assert 'href="#exp-pair-ntk"' in text and 'id="exp-pair-ntk"' in text       # contents -> sections
    assert text.index('id="exp-pair-ntk"') < text.index('id="exp-pair-hessian"')  # the experiments' order
    assert "2026-01-02T03:04:05Z" in text and "1 min 23 s" in text
    assert "<li>condition number 12 vs 340</li>" in text
    # every figure that is one is drawn, with deterministic div ids
    assert len(re.findall(r'class="plotly-graph-div"', text)) == 2
    assert 'id="exp-pair-ntk--1-spectrum"' in text and 'id="exp-pair-hessian--1-lambda-max"' in text
    assert write_report(out).read_text() == text                   # the same files, the same page


def test_text_from_files_is_escaped(out):
    text = write_report(out).read_text()
    assert XSS not in text
    assert html.escape(XSS) in text                               # a finding line shows as text
    assert "spectrum \\u003cscript\\u003e" in text                    # a trace name stays inside its JSON
    assert "<b>7</b>" not in text and "&lt;b&gt;7&lt;/b&gt;" in text


def test_a_malformed_figure_is_a_note_naming_the_file(out):
    text = write_report(out).read_text()
    hessian = text[text.index('id="exp-pair-hessian"'):]
    assert re.search(r'class="note">figure broken\.json is not valid JSON', hessian)
    assert re.search(r'class="note">figure not_a_figure\.json is not a plotly figure', hessian)
    assert 'id="exp-pair-hessian--1-lambda-max"' in hessian       # the rest of the section renders
    assert "numbers.csv" in hessian


def test_tables_are_capped_and_escaped(out):
    text = write_report(out).read_text()
    hessian = text[text.index('id="exp-pair-hessian"'):]
    assert f"the first {MAX_TABLE_ROWS} of {MAX_TABLE_ROWS + 50} rows" in hessian
    assert hessian.count("<tr>") == MAX_TABLE_ROWS + 1              # the header and the first rows
    ntk = text[text.index('id="exp-pair-ntk"'):text.index('id="exp-pair-hessian"')]
    assert "correlations.csv" in ntk and "<td>sharpness</td>" in ntk


def test_a_figure_rejected_by_plotly_is_a_note(tmp_path):
    out = tmp_path / "out"
    bad = json.dumps({"data": [{"type": "scatter", "y": [1], "no_such_property": 1}], "layout": {}})
    _experiment(out, "odd", "Odd", {"bad": bad}, done=False, listed=False)
    text = write_report(out).read_text()
    assert "figure bad.json is not a valid plotly figure" in text
    assert "no done.json" in text
    assert BANNER not in text                                      # no figure: no plotly.js


def test_figures_found_without_a_list_in_the_record(tmp_path):
    out = tmp_path / "out"
    _experiment(out, "old", "Old", {"b": _figure("b", [1]), "a": _figure("a", [2])}, listed=False,
                tables={"numbers": "x\n1\n"})
    text = write_report(out).read_text()
    assert text.index('--1-a"') < text.index('--2-b"')
    assert "runs.json" not in re.findall(r"<h3>([^<]*)</h3>", text)


def test_nothing_to_report_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing to report"):
        write_report(tmp_path)
    (tmp_path / "stray").mkdir()
    with pytest.raises(UserError, match="nothing to report"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        write_report(tmp_path / "missing")
    assert not (tmp_path / "report.html").exists()


def test_cli_writes_the_report(out, tmp_path, capsys):
    to = tmp_path / "elsewhere" / "page.html"
    assert main(["report", "--out", str(out), "--to", str(to)]) == 0
    assert capsys.readouterr().out.strip() == str(to)
    assert to.read_text().count(BANNER) == 1
    assert main(["report", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html") and (out / "report.html").is_file()
    assert main(["report", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m experiments report: error:") and len(err.strip().splitlines()) == 1


def test_experiment_pages_share_one_plotlyjs(tmp_path):
    out = tmp_path / "out"
    ctx = Context(store=SimpleNamespace(root=tmp_path / "runs"), out=out, quick=True)
    for name in ("first", "second"):
        outcome = Outcome(figures={"main": _figure(name, [1, 2]), "extra": _figure(name, [3])},
                          rows=[{"model": "m", "x": 1.0}], run_ids=["r-1"])
        write_outputs(ctx, name, name.title(), outcome, 1.0)
    bundle = out / "plotly.min.js"
    assert bundle.read_bytes() == plotly.offline.get_plotlyjs().encode()
    assert sorted(p.name for p in out.glob("**/plotly*.js")) == ["plotly.min.js"]
    for name in ("first", "second"):
        for stem in ("main", "extra"):
            page = (out / name / f"{stem}.html").read_text()
            assert BANNER not in page and len(page) < 100_000
            assert '<script charset="utf-8" src="../plotly.min.js"></script>' in page
        meta = json.loads((out / name / "runs.json").read_text())
        assert meta["figures"] == ["main", "extra"] and meta["tables"] == ["numbers"]
    mtime = bundle.stat().st_mtime_ns
    write_outputs(ctx, "first", "First", Outcome(figures={"main": _figure("again", [1])}, rows=[], run_ids=[]), 1.0)
    assert bundle.stat().st_mtime_ns == mtime                      # the same bundle is not written again
    text = write_report(out).read_text()
    assert text.count(BANNER) == 1 and "again" in text and 'id="exp-first--2-' not in text
