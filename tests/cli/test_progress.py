"""Progress on stderr: tqdm bars on a terminal; plain lines without carriage returns in a log."""
from __future__ import annotations

import io

from probe.cli import main
from probe.cli.common import TqdmProgress


def test_plain_lines_when_stderr_is_not_a_terminal():
    log = io.StringIO()
    progress = TqdmProgress(False, stream=log, min_interval_s=0.0)
    for done in range(0, 201):
        progress("hessian products", done, 200)
    for done in range(1, 4):
        progress("epoch 1/3", done, 3)
    progress.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [ln.split(" (")[0] for ln in lines[:10]] == [f"hessian products: {20 * i}/200" for i in range(1, 11)]
    assert lines[10:] == [ln for ln in lines[10:] if ln.startswith("epoch 1/3: ")] and len(lines) == 13


def test_short_work_prints_nothing_in_a_log_and_quiet_nothing_anywhere():
    log = io.StringIO()
    progress = TqdmProgress(False, stream=log)                 # the default: a line at most every 10 s
    for done in range(0, 101):
        progress("fast", done, 100)
    assert log.getvalue() == ""
    quiet = TqdmProgress(True, stream=log, tty=True)
    quiet("x", 1, 2)
    assert log.getvalue() == ""


def test_a_terminal_gets_tqdm_bars():
    term = io.StringIO()
    progress = TqdmProgress(False, stream=term, tty=True)
    for done in range(0, 11):
        progress("bar", done, 10)
    progress.close()
    assert "\r" in term.getvalue()                           # what a log must not get


def test_a_probe_command_writes_no_carriage_return_into_a_log(tmp_path, capsys):
    try:
        code = main(["saturation", "--model", "tiny_mul", "--n", "8", "--runs", str(tmp_path)])
    except SystemExit as e:                                   # pragma: no cover
        code = e.code
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "\r" not in err and "\r" not in out
