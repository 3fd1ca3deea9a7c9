"""``probe explore`` serves the explorer on localhost; once in a real headless Chromium (marker
``browser``): the runs table and a plotly chart render, the Findings page draws the stored findings,
and no error element shows."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from probe.store import RunStore
from probe.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / ".artifacts"
FINDING_TITLES = ("Browser cells", "Browser correlations")


def _findings(store: RunStore) -> None:
    """Two small findings for the Findings page."""
    cells = [{"regime": "small", "data": "digits", "n_train": 64, "depth": 8, "image_size": None, "epochs": 2,
              "variant": v, "formula": f, "seed": seed, "run_id": f"r{seed}", "status": "finished",
              "train_loss": 0.1, "train_err": tr, "test_loss": 0.2, "test_err": te}
             for v, f, seed, tr, te in (("fmm01", "r + s", 0, 1.0, 5.0), ("fmm08", "r * s", 0, 8.0, None))]
    store.save_finding("regimes", "cells", {"kind": "cells", "title": FINDING_TITLES[0], "rows": cells})
    rows = [{"measure": "sat", "label": "saturation", "kind": "optimisation", "group": g, "rho": rho, "lo": None,
             "hi": None, "p": None, "p_holm": None, "n": 5} for g, rho in (("all", 0.3), ("mul", None))]
    store.save_finding("fusion_table", "correlations",
                       {"kind": "correlations", "title": FINDING_TITLES[1], "when": "trained", "rows": rows})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """A store with two tiny runs and two findings, served by `probe explore` on a free localhost port."""
    root = tmp_path / "runs"
    store = RunStore(root)
    for model in ("tiny_add", "tiny_mul"):
        train(TrainConfig(model=model, epochs=2, limit_train=64, limit_test=32), store)
    _findings(store)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "probe.cli", "explore", "--port", str(port), "--runs", str(root)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    break
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            pytest.fail(f"probe explore exited: {proc.stderr.read()[-2000:]}")
    else:
        proc.kill()
        pytest.fail("the explorer did not come up within 90 s")
    yield url, proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_probe_explore_serves_on_localhost(served):
    url, proc = served
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200 and "<html" in r.read().decode().lower()
    port = int(url.rsplit(":", 1)[1])
    other = _non_loopback_address()
    if other is None:
        pytest.skip("no non-loopback address here to check that the explorer is not reachable on it")
    with socket.socket() as s:  # bound to 127.0.0.1 only: this machine's other address is refused
        s.settimeout(2)
        assert s.connect_ex((other, port)) != 0


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than 127.x (the route a UDP socket would take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


@pytest.mark.browser
def test_explorer_renders_in_headless_chromium(served):
    """Selenium drives Debian's chromium through chromedriver (both installed by .ci/run)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if browser is None or driver_bin is None:
        pytest.skip("no Chromium / chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_bin), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 90, poll_frequency=0.5)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'))  # the runs table
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg"))  # a drawn chart
        time.sleep(1.0)  # let the last frames paint before the screenshot
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "explorer.png"
        driver.save_screenshot(str(shot))
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')
        assert shot.stat().st_size > 20_000

        driver.find_element(By.XPATH, '//*[@data-testid="stSidebar"]//label[normalize-space()="Findings"]').click()
        for title in FINDING_TITLES:
            wait.until(lambda d, t=title: d.find_elements(By.XPATH, f'//h3[contains(normalize-space(), "{t}")]'))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) >= 2)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]')) >= 2)
        time.sleep(1.0)
        shot = ARTIFACTS / "explorer_findings.png"
        driver.save_screenshot(str(shot))
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')
        assert shot.stat().st_size > 20_000
    finally:
        driver.quit()
