"""The CLI's error contract at its edges: one line (and with --json one JSON object on stdout), no
traceback, damaged catalog rows reported and still listed, a closed pipe, --version, help texts."""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from probe.cli import build_parser, main
from probe.store import RunStore
from probe.training import TrainConfig, train
from tests.probes.test_registry import cli

REPO = Path(__file__).resolve().parents[2]


def one_line(code, err, needle):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    """A finished one-process run of tiny_add, 2 epochs (2 checkpoints)."""
    root = tmp_path_factory.mktemp("runs")
    res = train(TrainConfig(model="tiny_add", epochs=2, limit_train=64, limit_test=32, schedule="constant"),
                RunStore(root))
    return root, res.run_id


def test_resume_with_another_process_count_is_refused_before_torchrun(run1, capsys):
    root, run_id = run1
    code, out, err = cli(capsys, "train", "--resume", run_id, "--nproc", "2", "--runs", str(root))
    one_line(code, err, "was trained by 1 process(es)")


def test_a_bad_collective_timeout_is_refused_before_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROBE_DIST_TIMEOUT", "abc")
    code, out, err = cli(capsys, "train", "--model", "tiny_add", "--epochs", "1", "--nproc", "2",
                         "--runs", str(tmp_path))
    one_line(code, err, "PROBE_DIST_TIMEOUT='abc'")
    assert not (tmp_path / "catalog.sqlite").exists()


def test_explore_refuses_a_bad_host_and_a_runs_file(tmp_path, capsys):
    code, out, err = cli(capsys, "explore", "--host", "no such host!", "--runs", str(tmp_path))
    one_line(code, err, "--host 'no such host!'")
    f = tmp_path / "afile"
    f.write_text("x")
    code, out, err = cli(capsys, "explore", "--runs", str(f))
    one_line(code, err, "a file, not a folder")


def _damaged_copy(src: Path, dst: Path, sql: str, params=()) -> Path:
    import shutil

    shutil.copytree(src, dst)
    con = sqlite3.connect(dst / "catalog.sqlite")
    con.execute("PRAGMA ignore_check_constraints = ON")  # a row written by another tool, or damaged
    with con:
        con.execute(sql, params)
    con.close()
    return dst


def test_a_run_row_with_an_invalid_status_is_listed_as_damaged(run1, tmp_path, capsys):
    root, run_id = run1
    bad = _damaged_copy(root, tmp_path / "r", "UPDATE runs SET status = 'bogus' WHERE run_id = ?", (run_id,))
    code, out, err = cli(capsys, "runs", "--json", "--runs", str(bad))
    assert code == 0, err
    data = json.loads(out)
    assert data["count"] == 1 and data["runs"][0]["run_id"] == run_id and data["runs"][0]["status"] == "damaged"
    assert "bogus" in data["runs"][0]["problem"] and len(data["skipped"]) == 1
    assert "damaged" in err                                         # the warning names the row
    code, out, err = cli(capsys, "runs", "--runs", str(bad))
    assert run_id in out and "damaged" in out
    code, out, err = cli(capsys, "show", run_id, "--runs", str(bad))
    one_line(code, err, "damaged")


def test_a_checkpoint_row_with_an_empty_path_is_reported_by_show(run1, tmp_path, capsys):
    root, run_id = run1
    bad = _damaged_copy(root, tmp_path / "r", "UPDATE checkpoints SET path = '' WHERE run_id = ? AND epoch = 2",
                        (run_id,))
    code, out, err = cli(capsys, "show", run_id, "--json", "--runs", str(bad))
    assert code == 0, err
    data = json.loads(out)
    assert data["checkpoints"] == [1]
    assert [d["epoch"] for d in data["damaged_checkpoints"]] == [2]
    assert any("epoch 2" in line for line in data["skipped"]) and "epoch 2" in err
    code, out, err = cli(capsys, "show", run_id, "--runs", str(bad))
    assert "checkpoints: [1]" in out and "damaged checkpoint rows (epochs): [2]" in out


@pytest.mark.parametrize("argv", [
    ["ntk", "--model", "no_such_model", "--json"],
    ["models", "--json", "--bogus"],
    ["show", "nothing", "--json", "--runs", "{tmp}"],
])
def test_json_errors_are_one_json_object_on_stdout(tmp_path, capsys, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = cli(capsys, *argv)
    assert code == 2
    obj = json.loads(out)
    assert obj["exit_code"] == 2 and obj["error"] == err.strip()
    assert len(out.strip().splitlines()) == 1


def test_a_closed_pipe_is_no_traceback():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(f"{sys.executable} -m probe.cli fusions | head -n 2", shell=True, capture_output=True,
                          text=True, env=env, timeout=120)
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out, _ = capsys.readouterr()
    import probe
    assert e.value.code == 0 and out.strip() == f"probe {probe.__version__}"


def test_help_texts_state_one_default_and_the_hessian_product():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            text = action.help or ""
            assert text.count("default") <= 1, (name, action.option_strings, text)
    assert "jvp over grad" not in sub.choices["hessian"].format_help().replace("\n", " ")
    assert "kept gradient graph" in " ".join(sub.choices["hessian"].format_help().split())
