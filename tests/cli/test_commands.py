"""`probe models` / `probe fusions` and the CLI's error contract (exit 2, one line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from probe.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fusions_json_lists_every_seed_row(capsys):
    code, out, err = run(capsys, "fusions", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["count"] >= 59 and len(data["fusions"]) == data["count"]
    row = data["fusions"][0]
    assert set(row) >= {"id", "name", "formula", "caltech101_top1", "seed_code"}
    assert row["name"] == "add,r=bn,s=id" and row["caltech101_top1"] == 87.62


def test_fusions_parse(capsys):
    code, out, _ = run(capsys, "fusions", "--parse", "fmm08", "--json")
    assert code == 0 and json.loads(out)["name"] == "mul,r=bn@b=fixed:0/sig,s=bn@b=fixed:1"


def test_models_json_has_parameter_counts(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["models"]}
    assert {"add_resnet", "mul_resnet", "wrn16_10", "wrn", "cifar_resnet", "resnet4", "tiny_add"} <= set(rows)
    assert abs(rows["wrn16_10"]["params"] - 17.2e6) / 17.2e6 < 0.01
    assert rows["mul_resnet"]["params"] > rows["add_resnet"]["params"]  # the extra bn_s per block


@pytest.mark.parametrize("argv,needle", [
    (["fusions", "--parse", "mul,r=bogus"], "unknown or out of order"),
    (["fusions", "--parse", "fmm099"], "unknown seed fusion"),
    (["nosuchcommand"], "invalid choice"),
    (["models", "--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) if argv[0] == "nosuchcommand" or "--bogus" in argv else _nullcontext() as exc:
        code = main(argv)
    if exc is not None and hasattr(exc, "value"):
        code = exc.value.code
    _, err = capsys.readouterr()
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_console_script_end_to_end(tmp_path):
    """The installed entry point (or `python -m probe.cli`) with a bad model name: exit 2, one line."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "probe.cli", "fusions", "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["count"] >= 59
