"""Fixtures for browser tests: a real JupyterLab server and headless Debian Chromium.

* ``lab_server``: ``jupyter lab`` on 127.0.0.1 (free port, empty token) with every
  Jupyter/IPython directory in a temp folder, the repository on PYTHONPATH, the
  news/update notifications switched off.
* ``browser_page``: a Playwright (sync API) page in /usr/bin/chromium, launched with
  the flags measured in shared/TOOLING.md; never ``playwright install``.
  Skipped, with the reason, when /usr/bin/chromium is missing
  (``apt-get install -y chromium``).
* ``browser_notebook``: the py:percent notebooks to open: the small fixture next
  to this file, and the real notebook 07 on the real quick run (``quick_run``,
  tests/conftest.py); ``SCREENER_BROWSER_NOTEBOOK`` overrides them;
  ``browser_notebook_parameters`` (plus env ``SCREENER_BROWSER_PARAMS``, JSON)
  are injected after its ``parameters`` cell as papermill would.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SERVER_START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (the Makefile does it for CI)")
    pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (pip install playwright)")
    return CHROMIUM


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory, chromium_path):
    """(base_url, root_dir) of a JupyterLab server that only this session uses."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                     ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces")):
        (tmp / sub).mkdir()
        env[var] = str(tmp / sub)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("SCREENER_HEADLESS", None)
    # no "news" popup, no update check: they cover the notebook and need the network
    notif = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # start the notebook's kernel without the "Select Kernel" dialog
    tracker = tmp / "lab-settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"autoStartDefaultKernel": True}))
    port = _free_port()
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", "--ServerApp.open_browser=False",
         f"--ServerApp.root_dir={root}", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(SERVER_START_TIMEOUT_S * 4):
            try:
                with urllib.request.urlopen(f"{base}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            try:  # waits 0.25 s, and notices a server that died
                proc.wait(timeout=0.25)
                raise RuntimeError(f"jupyter lab exited ({proc.returncode}):\n{(tmp / 'server.log').read_text()}")
            except subprocess.TimeoutExpired:
                pass
        else:
            raise RuntimeError(f"jupyter lab did not answer in {SERVER_START_TIMEOUT_S} s:\n"
                               f"{(tmp / 'server.log').read_text()}")
        yield base, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium_path), headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def browser_page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.console_messages = []  # type: ignore[attr-defined]
    page.on("console", lambda m: page.console_messages.append(f"{m.type}: {m.text}"))
    yield page
    context.close()


@pytest.fixture(params=["fixture", "07_explore"])
def browser_notebook(request) -> Path:
    """The py:percent notebook the viewer browser test opens.

    ``fixture``: the small synthetic notebook next to this file (no run needed).
    ``07_explore``: the real notebook 07 on the real quick-profile run (the
    ``quick_run`` fixture: the whole chain executed headless by the runner).
    ``SCREENER_BROWSER_NOTEBOOK`` overrides both with one notebook.
    """
    override = os.environ.get("SCREENER_BROWSER_NOTEBOOK")
    if override:
        path = Path(override)
    elif request.param == "fixture":
        path = Path(__file__).resolve().parent / "viewer_fixture.py"
    else:
        path = REPO / "notebooks" / f"{request.param}.py"
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        raise FileNotFoundError(f"SCREENER_BROWSER_NOTEBOOK: no such notebook {path}")
    return path


@pytest.fixture
def browser_notebook_parameters(request, browser_notebook) -> dict:
    """Values injected after the notebook's ``parameters`` cell (papermill's way).

    Notebook 07 gets the quick run and ``interactive=True`` (a person is watching);
    ``SCREENER_BROWSER_PARAMS`` (JSON) adds or overrides values, e.g.
    ``'{"profile": "quick", "run_dir": "/tmp/run"}'``."""
    params: dict = {}
    if browser_notebook.stem == "07_explore":
        params = {"profile": "quick", "run_dir": str(request.getfixturevalue("quick_run")), "interactive": True}
    raw = os.environ.get("SCREENER_BROWSER_PARAMS", "")
    try:
        extra = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"SCREENER_BROWSER_PARAMS: expected a JSON object, found {raw!r} ({e})") from e
    if not isinstance(extra, dict):
        raise ValueError(f"SCREENER_BROWSER_PARAMS: expected a JSON object, found {raw!r}")
    return {**params, **extra}


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
