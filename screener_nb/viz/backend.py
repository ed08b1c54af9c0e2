"""Which viewer backend a notebook gets: itkwidgets (3D, needs its CDN) or the offline viewer.

``backend="auto"`` picks itk only when (1) itkwidgets is installed (checked without
importing it: importing it patches the kernel), (2) we run in an interactive Jupyter
kernel (:func:`detect_interactive`) and (3) the viewer's CDN hosts answer a TCP probe
(:func:`network_available`, cached). Otherwise the offline viewer.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import threading
import warnings
from pathlib import Path

from ..errors import ConfigError

BACKENDS = ("auto", "itk", "offline")

#: hosts itkwidgets 1.0a55 loads its viewer from (used when the installed
#: package cannot be read); see itkwidgets/viewer_config.py
DEFAULT_VIEWER_HOSTS = (
    "cdn.jsdelivr.net",
    "bafybeieiqiiwvdq66e2bndws5nwojbe4wwerbxyua6u37axxivi2rwf7wy.ipfs.dweb.link",
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def itkwidgets_installed() -> bool:
    """Whether itkwidgets can be imported, checked WITHOUT importing it."""
    try:
        return importlib.util.find_spec("itkwidgets") is not None
    except (ImportError, ValueError):
        return False


def viewer_hosts() -> tuple[str, ...]:
    """CDN hosts the installed itkwidgets fetches its viewer from (read from its source, not imported)."""
    try:
        spec = importlib.util.find_spec("itkwidgets")
        if spec and spec.submodule_search_locations:
            text = (Path(list(spec.submodule_search_locations)[0]) / "viewer_config.py").read_text()
            hosts = tuple(dict.fromkeys(re.findall(r"https://([^/\"']+)", text)))
            if hosts:
                return hosts
    except (OSError, ImportError, ValueError):
        pass
    return DEFAULT_VIEWER_HOSTS


@functools.lru_cache(maxsize=8)
def _probe_hosts(hosts: tuple[str, ...], timeout: float) -> bool:
    """True when every host accepts a TCP connection on 443 within ``timeout`` seconds.

    Runs in daemon threads and waits at most ``timeout`` overall: a DNS lookup
    that hangs (air-gapped machines) cannot stall the notebook.
    """
    results: dict[str, bool] = {}

    def one(host: str) -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                results[host] = True
        except OSError:
            results[host] = False

    threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return all(results.get(h, False) for h in hosts)


def network_available(force: bool | None = None, *, timeout: float = 1.5,
                      hosts: tuple[str, ...] | None = None) -> bool:
    """Whether the itk viewer's CDN hosts are reachable (cached per process).

    ``force`` (or the environment variable ``SCREENER_VIEWER_NETWORK=0/1``)
    skips the probe.
    """
    if force is not None:
        return bool(force)
    env = os.environ.get("SCREENER_VIEWER_NETWORK", "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    return _probe_hosts(tuple(hosts or viewer_hosts()), float(timeout))


def _headless_env() -> bool:
    from ..runtime import headless

    return headless()


def detect_interactive() -> tuple[bool, str]:
    """Is a person looking at this kernel? Returns ``(answer, reason)``.

    No when ``SCREENER_HEADLESS`` is set (the runner sets it), when not inside a
    Jupyter kernel (plain Python, terminal IPython), or when the kernel was not
    started by a Jupyter server (papermill/nbclient kernels lack the
    ``JPY_SESSION_NAME`` variable that jupyter_server sets for the notebook it
    serves). Notebooks should still pass their ``interactive`` parameter.
    """
    if _headless_env():
        return False, "SCREENER_HEADLESS is set"
    try:
        from IPython import get_ipython
    except ImportError:
        return False, "IPython is not installed"
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False, "not running in a Jupyter kernel"
    if not os.environ.get("JPY_SESSION_NAME"):
        return False, "kernel not started by a Jupyter server (papermill / nbclient run)"
    return True, "Jupyter kernel served to a browser"


def choose_backend(backend: str = "auto", *, interactive: bool | None = None,
                   network: bool | None = None) -> tuple[str, str]:
    """Resolve ``backend`` to ``("itk" | "offline", reason)`` without importing itkwidgets.

    ``backend="itk"`` in a headless run falls back to offline with a warning
    (the itk viewer would block the kernel); ``"itk"`` without itkwidgets
    installed raises ImportError.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"explore(backend): expected one of {BACKENDS}, found {backend!r}")
    if backend == "offline":
        return "offline", "offline backend requested"
    if interactive is None or _headless_env():
        inter, why = detect_interactive()  # SCREENER_HEADLESS wins even over interactive=True: never block
    else:
        inter, why = bool(interactive), f"interactive={bool(interactive)}"
    if not inter:
        if backend == "itk":
            warnings.warn(f"explore: the itk viewer blocks headless kernels ({why}); "
                          "showing the offline viewer instead", RuntimeWarning, stacklevel=3)
        return "offline", f"headless ({why})"
    if not itkwidgets_installed():
        if backend == "itk":
            raise ImportError("explore(backend='itk') needs itkwidgets: pip install 'screener_nb[viewer]'")
        return "offline", "itkwidgets is not installed (pip install 'screener_nb[viewer]')"
    if backend == "itk":
        return "itk", "itk backend requested"
    if not network_available(network):
        return "offline", f"the itk viewer's CDN ({', '.join(viewer_hosts())}) is unreachable"
    return "itk", "itkwidgets installed, interactive kernel, CDN reachable"
