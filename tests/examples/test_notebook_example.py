"""examples/notebook.py, the tour of the flat API on a model of one's own, runs as written: every
probe's result has a repr with its samples, a DataFrame and titled figures, written as pages that
share one plotly.min.js."""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np

from probe.figures._common import untitled_axes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "notebook.py"


def test_notebook_tour_runs(tmp_path, capsys, one_thread):
    tour = runpy.run_path(str(EXAMPLE), run_name="example")["tour"]
    results = tour(tmp_path)
    out = capsys.readouterr().out
    assert set(results) == {"hessian", "ntk", "surface", "gradvar", "saturation", "interp", "ntk spectrum"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".js") == ["plotly.min.js"]
    assert len(list(tmp_path.glob("*.html"))) == len(results)
    h = results["hessian"]
    assert repr(h).startswith("HessianResult(hessian: samples=64 of 400,") and "lambda_max=" in repr(h)
    assert any("used 64 of the 400 samples given" in note for note in h.notes)
    frame = h.to_frame()
    assert frame.index.name == "rank" and list(frame.index) == [1, 2, 3, 4]
    np.testing.assert_array_equal(frame["eigenvalues"].to_numpy(), h.eigenvalues)
    surface = results["surface"].to_frame()
    assert len(surface) == 49 and {"alpha", "beta", "loss", "accuracy"} <= set(surface.columns)
    assert list(results["gradvar"].to_frame().index) == list(results["gradvar"].names)
    for name, result in results.items():
        assert "samples=" in repr(result), name
        assert len(result.to_frame()) > 0, name
        assert repr(result) in out
        for title, fig in result.figures("SmallNet").items():
            assert untitled_axes(fig) == [], (name, title)
    assert h.figure().data[0].name == "model (init)"
