"""Binder configuration: what can be checked without Docker and without conda.

* repo2docker (the tool mybinder.org builds images with) parses ``binder/`` and plans
  the conda environment, the postBuild script and the start script;
* ``binder/postBuild`` itself runs on a temporary copy of the repository (the files git
  would commit) with this environment's tools on PATH, and HOME / Jupyter folders
  redirected into the temporary folder so the user's configuration is never touched.

The package step runs with ``PIP_DRY_RUN=1``: pip reads ``PIP_<OPTION>`` variables as
command-line options, so the unchanged script builds and resolves the copied package
("Would install screener_nb-...") but installs nothing, and the shared .venv keeps its
editable install of the real checkout (checked below). The later steps use the copy
anyway: ``python -m`` runs from the copy's root and PYTHONPATH points the notebook
kernels at it.

The demo step runs the whole quick chain (minutes): it is in the ``slow`` (and
``notebook``) test, which copies the chain of the notebook tests (``quick_run`` in
tests/conftest.py) through ``SCREENER_BINDER_RUN_FROM`` when this session runs those tests
anyway, and otherwise runs it for real.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def repo2docker_exe() -> str:
    exe = shutil.which("repo2docker", path=str(BIN)) or shutil.which("repo2docker")
    assert exe, "repo2docker not found: it is part of the dev extra (pip install jupyter-repo2docker)"
    return exe


def copy_repo(dest: Path) -> Path:
    """The files a commit would hold (tracked + untracked-not-ignored), copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def postbuild_env(tmp: Path, repo: Path, **extra: str) -> dict[str, str]:
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "SCREENER_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(home), JUPYTER_CONFIG_DIR=str(home / ".jupyter"), JUPYTER_DATA_DIR=str(home / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"), IPYTHONDIR=str(home / ".ipython"),
        PYTHONPATH=str(repo), PIP_DRY_RUN="1", **extra,
    )
    return env


def run_postbuild(repo: Path, env: dict, *steps: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "binder" / "postBuild"), *steps], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)


def venv_install_state() -> dict[str, str]:
    """The venv's record of the screener_nb install: editable finder, .pth, dist-info files."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    state = {}
    for path in sorted(site.glob("*screener_nb*")):
        for f in ([path] if path.is_file() else sorted(path.iterdir())):
            state[str(f.relative_to(site))] = f.read_text(errors="replace")
    return state


def code_cells_in_percent_file(path: Path) -> int:
    """Count ``# %%`` code cells of a py:percent file by hand (markdown cells excluded)."""
    markers = [line for line in path.read_text().splitlines() if line.startswith("# %%")]
    return sum("[markdown]" not in m and "[md]" not in m for m in markers)


def check_notebooks(repo: Path) -> None:
    import nbformat

    sources = sorted((repo / "notebooks").glob("[0-9][0-9]_*.py"))
    assert sources, "no numbered notebooks in the copy"
    for src in sources:
        ipynb = src.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb.name} was not generated"
        nb = nbformat.read(ipynb, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3", ipynb.name
        assert sum(c.cell_type == "code" for c in nb.cells) == code_cells_in_percent_file(src), ipynb.name
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{ipynb.name}: no parameters cell"


def check_labconfig(tmp: Path) -> None:
    settings = tmp / "home" / ".jupyter" / "labconfig" / "default_setting_overrides.json"
    assert settings.exists(), "jupytext-config did not write the labconfig into JUPYTER_CONFIG_DIR"
    viewers = json.loads(settings.read_text())["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers == {"python": "Jupytext Notebook"}  # .py opens as a notebook; README.md stays Markdown


# --------------------------------------------------------------------------- repo2docker
def test_repo2docker_plans_the_binder_folder():
    out = subprocess.run([repo2docker_exe(), "--no-build", "--no-run", str(REPO)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # stderr: what it detected; stdout: the Dockerfile it would build
    assert f"Using local repo {REPO}." in out.stderr
    assert "Building conda environment for python=3.11" in out.stderr
    dockerfile = out.stdout
    assert '--file "binder/environment.yml"' in dockerfile  # binder/ wins over the root environment.yml
    assert "COPY --chown=0:0 src/binder/environment.yml" in dockerfile
    assert "RUN ./binder/postBuild" in dockerfile
    assert 'ENV R2D_ENTRYPOINT="${REPO_DIR}/binder/start"' in dockerfile


def test_repo2docker_rejects_a_broken_environment_file(tmp_path):
    """The check above can fail: repo2docker really reads binder/environment.yml."""
    (tmp_path / "binder").mkdir()
    (tmp_path / "binder" / "environment.yml").write_text("dependencies: [python=3.11\n")
    out = subprocess.run([repo2docker_exe(), "--no-build", "--no-run", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert 'in "binder/environment.yml"' in out.stderr


def test_binder_files_are_executable_bash_scripts():
    for name in ("postBuild", "start"):
        path = REPO / "binder" / name
        assert os.access(path, os.X_OK), f"binder/{name} is not executable"
        assert path.read_text().startswith("#!/bin/bash\n"), f"binder/{name}: shebang"
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, f"binder/{name}: bash syntax"
    assert "set -euo pipefail" in (REPO / "binder" / "postBuild").read_text()


def test_start_points_the_notebooks_at_the_demo_run(tmp_path):
    start = REPO / "binder" / "start"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "REPO_DIR": "/srv/repo"}
    out = subprocess.run([str(start), "bash", "-c", 'echo "$SCREENER_RUN_DIR|$0|$1"', "a b", "c"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/srv/repo/runs/binder|a b|c"  # arguments handed over untouched
    env["SCREENER_RUN_DIR"] = "/data/myrun"
    out = subprocess.run([str(start), "printenv", "SCREENER_RUN_DIR"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "/data/myrun"  # an explicit choice is kept


# --------------------------------------------------------------------------- postBuild
def test_postbuild_package_notebooks_labconfig_on_a_copy(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    assert not list((repo / "notebooks").glob("*.ipynb"))  # git ignores them: the copy has none
    before = venv_install_state()
    assert any("direct_url.json" in k for k in before), "screener_nb is not pip-installed in this venv"
    env = postbuild_env(tmp_path, repo)
    out = run_postbuild(repo, env, "package", "notebooks", "labconfig")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"Would install screener_nb-\d", out.stdout), out.stdout[-2000:]
    assert venv_install_state() == before  # the shared venv still holds the real checkout's install
    check_notebooks(repo)
    check_labconfig(tmp_path)


def test_postbuild_refuses_unknown_steps_and_unfinished_runs(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = postbuild_env(tmp_path, repo)
    out = run_postbuild(repo, env, "packages")
    assert out.returncode == 2 and "unknown step 'packages'" in out.stderr
    unfinished = tmp_path / "unfinished"
    (unfinished / "data").mkdir(parents=True)
    out = run_postbuild(repo, {**env, "SCREENER_BINDER_RUN_FROM": str(unfinished)}, "demo")
    assert out.returncode == 1
    assert f"SCREENER_BINDER_RUN_FROM={unfinished} holds no finished evaluation" in out.stderr
    assert not (repo / "runs").exists()


def test_postbuild_demo_copies_a_finished_run(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    finished = tmp_path / "finished"
    files = {"eval/DONE": "{}", "eval/maps/case_0/m.nii.gz": "x", "data/index.json": '{"cases": []}'}
    for rel, text in files.items():
        (finished / rel).parent.mkdir(parents=True, exist_ok=True)
        (finished / rel).write_text(text)
    env = postbuild_env(tmp_path, repo, SCREENER_BINDER_RUN_FROM=str(finished), SCREENER_BINDER_RUN_DIR="runs/elsewhere")
    out = run_postbuild(repo, env, "demo")
    assert out.returncode == 0, out.stderr
    copied = repo / "runs" / "elsewhere"
    assert {str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()} == set(files)
    assert all((copied / rel).read_text() == text for rel, text in files.items())


def shared_quick_run(request) -> Path | None:
    """The notebook tests' quick chain, only when another selected test of this session uses it."""
    others = [item for item in request.session.items
              if item is not request.node and "quick_run" in getattr(item, "fixturenames", ())]
    return request.getfixturevalue("quick_run") if others else None


@pytest.mark.slow
@pytest.mark.notebook  # runs the notebooks with papermill: `make test-fast` leaves it out
@pytest.mark.timeout(3600)
def test_postbuild_whole_script_builds_the_demo_artifacts(tmp_path, request):
    import nibabel as nib
    import numpy as np
    import xarray as xr

    repo = copy_repo(tmp_path / "repo")
    extra = {}
    source = shared_quick_run(request)
    if source is not None:
        extra["SCREENER_BINDER_RUN_FROM"] = str(source)
    env = postbuild_env(tmp_path, repo, **extra)
    out = run_postbuild(repo, env, timeout=3300)  # no arguments: every step, as Binder runs it
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    check_notebooks(repo)
    check_labconfig(tmp_path)

    run = repo / "runs" / "binder"
    assert "demo artifacts ready in runs/binder" in out.stdout
    for stage in ("data", "descriptor", "condition", "density", "eval"):
        assert (run / stage / "DONE").exists(), f"{stage} did not finish"
    with xr.open_dataset(run / "eval" / "metrics.nc", engine="h5netcdf") as ds:
        numeric = [v for v in ds.data_vars if np.issubdtype(ds[v].dtype, np.number)]
        assert numeric and all(np.isfinite(ds[v].values).any() for v in numeric)
    maps = sorted((run / "eval" / "maps").rglob("*.nii.gz"))
    assert maps, "no anomaly maps"
    img = nib.load(maps[0])
    assert img.ndim == 3 and np.isfinite(np.asarray(img.dataobj)).all()
    executed = sorted(p.name for p in (run / "notebooks").glob("*.ipynb"))
    assert {"00_environment_check.ipynb", "06_evaluate.ipynb"} <= set(executed)
