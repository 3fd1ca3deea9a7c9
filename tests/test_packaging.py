"""The installed wheel: built from the source, installed into an empty folder and run from a working
directory outside the repository. One top-level package (``probe``) with the model zoo, the explorer
and the experiments inside it; the commands the README promises run from there."""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import probe
from probe import companions

ROOT = Path(__file__).resolve().parents[1]
#: left out of the copy the wheel is built from: at the top of the checkout only (probe/data is a package)
_TOP_SKIP = {".git", ".venv", "runs", "build", "out", ".pytest_cache", "tests", "benchmarks", "data"}


def _skip(folder: str, names: list[str]) -> set[str]:
    top = Path(folder).resolve() == ROOT
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in _TOP_SKIP)
            or (Path(folder).name == "experiments" and n == "out")}


def test_in_a_checkout_the_companions_are_the_top_level_folders():
    for name in companions.COMPANIONS:
        assert companions.qualified_name(name) == name
        assert Path(companions.load(name).__file__).resolve() == ROOT / name / "__init__.py"
    assert companions.qualified_name("models.fusion") == "models.fusion"
    import models.fusion
    assert companions.load("models.fusion") is models.fusion       # one copy of each module per process
    with pytest.raises(ValueError, match="not in a companion package"):
        companions.qualified_name("probe.store")


def test_probe_version_prints_the_package_version(capsys):
    from probe.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"probe {probe.__version__}"


def test_the_citation_file_carries_the_package_version():
    text = (ROOT / "CITATION.cff").read_text()
    assert f"\nversion: {probe.__version__}\n" in text
    assert "MIT" in (ROOT / "LICENSE").read_text().splitlines()[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, install folder): the wheel built from a copy of the source (the checkout is left
    without build/ or egg-info folders) and installed with ``pip install --no-deps --target``."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_skip)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "No module named" in build.stderr and "setuptools" in build.stderr:
        pytest.skip("setuptools is not installed in this python")     # pragma: no cover
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("landscape_probe-*.whl")
    target = tmp / "site"
    inst = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return wheel, target


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROBE_RUNS")}
    env["PYTHONPATH"] = str(target)            # the installed copy only: not the checkout
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package_and_its_metadata(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"probe", f"landscape_probe-{probe.__version__}.dist-info"}, tops
    for path in ("probe/data/__init__.py", "probe/cli/__init__.py", "probe/models/__init__.py", "probe/models/zoo.py", "probe/apps/explorer.py",
                 "probe/experiments/__main__.py", "probe/experiments/README.md", "probe/companions.py"):
        assert path in names, path
    assert not [n for n in names if "/out/" in n or "__pycache__" in n]
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(
        f"landscape_probe-{probe.__version__}.dist-info/METADATA"))
    assert meta["Version"] == probe.__version__
    assert meta["License-Expression"] == "MIT"
    assert f"landscape_probe-{probe.__version__}.dist-info/licenses/LICENSE" in names


@pytest.mark.slow
def test_the_installed_commands_run_outside_the_checkout(installed, tmp_path):
    _, target = installed
    # a researcher's own `models.py` in the working directory: neither shadows the other
    (tmp_path / "models.py").write_text("def make_net():\n    raise SystemExit('the user module ran')\n")
    script = target / "bin" / "probe"
    out = _run(target, tmp_path, sys.executable, str(script), "--help")
    assert out.returncode == 0 and "usage: probe" in out.stdout, out.stderr
    out = _run(target, tmp_path, sys.executable, str(script), "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"probe {probe.__version__}", out.stderr
    out = _run(target, tmp_path, sys.executable, "-m", "probe", "fusions")
    assert out.returncode == 0 and "fmm01" in out.stdout and "fmm59" in out.stdout, out.stderr
    out = _run(target, tmp_path, sys.executable, "-m", "probe.experiments", "--help")
    assert out.returncode == 0 and "usage: python -m probe.experiments" in out.stdout, out.stderr
    assert "experiments/out" in " ".join(out.stdout.split())     # outputs default under the cwd, not site-packages
    out = _run(target, tmp_path, sys.executable, "-m", "probe.experiments", "--list")
    assert out.returncode == 0 and "fusion_table" in out.stdout, out.stderr
    code = ("import probe.companions as c, models; "
            "print(c.load('models').__file__); print(c.load('apps').__file__); print(models.__file__)")
    out = _run(target, tmp_path, sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    ours, apps, theirs = out.stdout.split()
    assert Path(ours) == target / "probe" / "models" / "__init__.py"
    assert Path(apps) == target / "probe" / "apps" / "__init__.py"
    assert Path(theirs) == tmp_path / "models.py"
