"""envcheck: the shipped environment files agree with pyproject, and broken ones are caught.

The broken cases are written here by hand in a temporary folder (a small pyproject and
two environment files), so each test knows independently what must be reported.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from screener_nb import envcheck

REPO = Path(__file__).resolve().parents[2]

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]

[project]
name = "demo"
version = "0.1"
requires-python = ">=3.10"
dependencies = ["torch>=2.2", "numpy>=1.26", "scikit-image>=0.22", "PyYAML>=6.0"]

[project.optional-dependencies]
viewer = ["itkwidgets[lab]==1.0a55", "ngff-zarr<0.33"]
dev = ["pytest>=8", "jupyterlab>=4.2"]
"""

ROOT_OK = """
name: demo
channels: [conda-forge]
dependencies:
  - python=3.11
  - pip
  - pytorch-cpu>=2.2
  - numpy>=1.26
  - scikit-image>=0.22
  - pyyaml
  - pytest>=8
  - jupyterlab>=4.2,<5
  - pip:
      - -e .
"""

BINDER_OK = """
dependencies:
  - python=3.11
  - jupyterlab>=4.2,<5
  - pip:
      - --extra-index-url https://download.pytorch.org/whl/cpu
      - torch==2.13.0+cpu
      - numpy==2.4.6
      - scikit_image==0.26.0
      - pyyaml==6.0.3
      - itkwidgets[lab]==1.0a55
      - ngff-zarr==0.32.2
"""


def make_repo(tmp_path: Path, root: str = ROOT_OK, binder: str | None = BINDER_OK, pyproject: str = PYPROJECT) -> Path:
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(pyproject))
    (tmp_path / "environment.yml").write_text(textwrap.dedent(root))
    if binder is not None:
        (tmp_path / "binder").mkdir(exist_ok=True)
        (tmp_path / "binder" / "environment.yml").write_text(textwrap.dedent(binder))
    return tmp_path


def test_shipped_files_are_consistent(capsys):
    report = envcheck.check(REPO)
    assert report.errors == []
    assert envcheck.main(["--root", str(REPO)]) == 0
    assert "consistent" in capsys.readouterr().out


def test_command_line_reports_on_this_repository(tmp_path):
    # python -m screener_nb envcheck (default root: the repository holding the package)
    out = subprocess.run([sys.executable, "-m", "screener_nb", "envcheck"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "binder/environment.yml are consistent" in out.stdout
    # the module itself, on a broken copy: exit status 1 and the reason
    root = make_repo(tmp_path, binder=BINDER_OK.replace("numpy==2.4.6", "numpy==1.20"))
    out = subprocess.run([sys.executable, "-m", "screener_nb.envcheck", "--root", str(root)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "error: binder/environment.yml: 'numpy==1.20' contradicts pyproject core: numpy>=1.26" in out.stdout


def test_hand_made_consistent_files_pass(tmp_path):
    report = envcheck.check(make_repo(tmp_path))
    assert report.errors == [], report.errors
    assert report.warnings == [], report.warnings


def test_missing_package_names_file_and_package(tmp_path, capsys):
    root = make_repo(tmp_path, root=ROOT_OK.replace("  - scikit-image>=0.22\n", ""))
    report = envcheck.check(root)
    assert len(report.errors) == 1
    assert report.errors[0].startswith("environment.yml: missing 'scikit-image'")
    assert envcheck.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "environment.yml: missing 'scikit-image'" in out and "1 inconsistency" in out


def test_binder_must_hold_the_viewer_and_jupyterlab(tmp_path):
    binder = BINDER_OK.replace("      - itkwidgets[lab]==1.0a55\n", "").replace("  - jupyterlab>=4.2,<5\n", "")
    errors = envcheck.check(make_repo(tmp_path, binder=binder)).errors
    assert sorted(errors) == sorted([
        "binder/environment.yml: missing 'itkwidgets' (pyproject viewer: itkwidgets[lab]==1.0a55)",
        "binder/environment.yml: missing 'jupyterlab' (pyproject dev: jupyterlab>=4.2)",
    ])


def test_contradicting_pin_is_caught(tmp_path):
    binder = BINDER_OK.replace("itkwidgets[lab]==1.0a55", "itkwidgets[lab]==1.0a50")
    errors = envcheck.check(make_repo(tmp_path, binder=binder)).errors
    assert len(errors) == 1
    assert "binder/environment.yml" in errors[0] and "itkwidgets[lab]==1.0a50" in errors[0]
    assert "==1.0a55" in errors[0] and "contradicts" in errors[0]


def test_pins_outside_pyproject_ranges(tmp_path):
    binder = BINDER_OK.replace("numpy==2.4.6", "numpy==1.25.2").replace("ngff-zarr==0.32.2", "ngff-zarr==0.33.0")
    errors = envcheck.check(make_repo(tmp_path, binder=binder)).errors
    assert len(errors) == 2
    assert any("'numpy==1.25.2' contradicts pyproject core: numpy>=1.26" in e for e in errors)
    assert any("'ngff-zarr==0.33.0' contradicts pyproject viewer: ngff-zarr<0.33" in e for e in errors)


def test_conda_alias_resolves_to_the_pip_name(tmp_path):
    # pytorch (conda) is torch (pip): a conda pin below pyproject's range is a contradiction of torch
    root = ROOT_OK.replace("pytorch-cpu>=2.2", "pytorch=2.1")
    errors = envcheck.check(make_repo(tmp_path, root=root)).errors
    assert errors == ["environment.yml: 'pytorch=2.1' contradicts pyproject core: torch>=2.2"]
    # without any torch line the error names the pip name
    root = ROOT_OK.replace("  - pytorch-cpu>=2.2\n", "")
    errors = envcheck.check(make_repo(tmp_path, root=root)).errors
    assert errors == ["environment.yml: missing 'torch' (pyproject core: torch>=2.2)"]


def test_dropped_extras_and_bad_python(tmp_path):
    binder = BINDER_OK.replace("itkwidgets[lab]==1.0a55", "itkwidgets==1.0a55").replace("python=3.11", "python=3.9")
    errors = envcheck.check(make_repo(tmp_path, binder=binder)).errors
    assert len(errors) == 2
    assert any("'itkwidgets==1.0a55' lacks the extras [lab]" in e for e in errors)
    assert any(e.startswith("binder/environment.yml: 'python=3.9' contradicts") for e in errors)


def test_unknown_and_duplicate_packages_are_warnings_only(tmp_path, capsys):
    root = ROOT_OK.replace("  - pip:\n", "  - nodejs=20\n  - pip:\n      - numpy>=1.26\n")
    root_dir = make_repo(tmp_path, root=root)
    report = envcheck.check(root_dir)
    assert report.errors == []
    assert any("'nodejs=20' is not a dependency in pyproject.toml" in w for w in report.warnings)
    assert any("'numpy' listed 2 times" in w for w in report.warnings)
    assert envcheck.main(["--root", str(root_dir)]) == 0
    assert "warning: environment.yml: 'nodejs=20'" in capsys.readouterr().out


@pytest.mark.parametrize("content, found", [
    ("dependencies: [numpy\n", "valid YAML"),
    ("name: only-a-name\n", "no 'dependencies' list"),
    ("dependencies:\n  - {conda: numpy}\n", "{'conda': 'numpy'}"),
])
def test_unreadable_env_file_is_an_error_naming_it(tmp_path, content, found):
    errors = envcheck.check(make_repo(tmp_path, binder=content)).errors
    assert len(errors) == 1
    assert errors[0].startswith(str(tmp_path / "binder" / "environment.yml") + ": expected") and found in errors[0]


def test_missing_env_file_and_bad_pyproject(tmp_path, capsys):
    root = make_repo(tmp_path, binder=None)
    errors = envcheck.check(root).errors
    assert errors == [f"{tmp_path / 'binder' / 'environment.yml'}: expected a conda environment file, found no such file"]
    (tmp_path / "pyproject.toml").write_text("[project\n")
    assert envcheck.main(["--root", str(root)]) == 1
    assert "pyproject.toml: expected valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize("conda, pep440", [
    ("=3.11", "==3.11.*"), ("3.11.*", "==3.11.*"), ("=1.0=py311_0", "==1.0.*"), ("1.26.4", "==1.26.4"),
    ("1.26.* py311*", "==1.26.*"), (">=4.2,<5", ">=4.2,<5"), ("==2.13.0", "==2.13.0"), ("=2.4*", "==2.4.*"),
])
def test_conda_specs_translate_to_pep440(conda, pep440):
    assert envcheck.conda_spec(conda) == SpecifierSet(pep440)


def test_conda_specs_with_or_are_reported_unreadable(tmp_path):
    report = envcheck.check(make_repo(tmp_path, root=ROOT_OK.replace("numpy>=1.26", "numpy 1.26|1.27")))
    assert report.errors == []
    assert any("cannot read the version of 'numpy 1.26|1.27'" in w for w in report.warnings)


def test_compatible_matches_a_brute_force_search():
    """compatible() tries a few candidate versions; a dense grid of versions is the reference."""
    grid = [Version(f"{a}.{b}") for a, b in itertools.product(range(4), range(6))]
    grid += [Version(f"{a}.{b}.{c}") for a, b, c in itertools.product(range(4), range(6), range(5))]
    grid += [Version(f"{a}.{b}.{c}.{d}") for a, b, c, d in itertools.product(range(4), range(6), range(5), range(3))]
    specs = ["", ">=1.2", ">1.2", "<1.2", "<=1.2", "==1.2.*", "==1.2.3", "!=1.2.3", ">=2.0,<2.1", "~=1.4",
             ">1.2,<1.3", ">=3.1", "<0.1", "==2.*", ">2.5,<=3.0", ">=1.2.3,<1.2.4", "<1.0,>0.5"]
    for a, b in itertools.product(specs, repeat=2):
        sa, sb = SpecifierSet(a), SpecifierSet(b)
        reference = any(v in sa and v in sb for v in grid)
        assert envcheck.compatible(sa, sb) == reference, (a, b)


def test_names_normalise_like_pep503_and_aliases():
    assert envcheck.normalize("Scikit_Image") == envcheck.normalize("scikit.image") == "scikit-image"
    assert envcheck.normalize("PyYAML") == "pyyaml"
    for conda in ("pytorch", "pytorch-cpu", "pytorch-gpu"):
        assert envcheck.normalize(conda) == "torch"
    assert envcheck.normalize("python-kaleido") == "kaleido"
