"""Do ``pyproject.toml``, ``environment.yml`` and ``binder/environment.yml`` agree?

Three files list the same software for three installers: pip (``pyproject.toml``,
the reference), conda for local users (``environment.yml``) and Binder
(``binder/environment.yml``, which must be complete on its own because Binder
ignores root files when ``binder/`` exists). ``python -m screener_nb envcheck
[--root PATH]`` reads all three and reports

* **errors** (exit status 1): a package that pyproject requires and an
  environment file lacks; a version constraint that contradicts pyproject's
  (``itkwidgets==1.0a50`` against ``==1.0a55``, a pin outside pyproject's
  range); extras that pyproject asks for and the file drops
  (``itkwidgets`` instead of ``itkwidgets[lab]``); a Python version outside
  ``requires-python``; a file that is missing or not a conda environment;
* **warnings** (exit status unaffected): packages pyproject does not know, the
  same package listed twice, version specs this module cannot read.

What each file must cover:

==========================  ==============================================
``environment.yml``         core + ``dev`` (``viewer`` optional: checked if listed)
``binder/environment.yml``  core + ``viewer`` + ``jupyterlab`` (from ``dev``)
==========================  ==============================================

Names are compared after PEP 503 normalisation, and conda names that differ
from the pip name go through :data:`CONDA_ALIASES` (``pytorch-cpu`` is
``torch``). Conda match specs (``=2.4``, ``2.4.*``, ``>=1.2,<2``, ``==1.0``,
``name=1.0=build``) are translated to PEP 440 specifiers and compared with
``packaging.specifiers``. Two specifier sets are judged compatible when some
version satisfies both; the candidates tried are every version either set
names plus its immediate neighbours, which is exact for pins (what the files
mostly hold) and for the usual ``>=a,<b`` ranges.

Hand-written rather than delegated to a solver: conda cannot run here (no
channel is reachable), and what is needed is a comparison of declarations,
not a resolution.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

# conda package name -> pip distribution name (only where they differ).
# pyyaml, scikit-image, scikit-learn, jupyterlab, ... have the same name on both sides.
CONDA_ALIASES = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "python-kaleido": "kaleido",
    "pytables": "tables",
    "matplotlib-base": "matplotlib",
}

# Listed in environment files for the environment itself, not as project dependencies.
TOOLING = {"python", "pip", "setuptools", "wheel"}

ENV_FILES = {
    # file (relative to the root) -> (pyproject groups that must be covered, single packages of other groups)
    "environment.yml": (("core", "dev"), ()),
    "binder/environment.yml": (("core", "viewer"), ("jupyterlab",)),
}


def normalize(name: str) -> str:
    """PEP 503 normalised name; conda names are mapped to their pip name first.

    >>> normalize("Scikit_Image"), normalize("pytorch-cpu"), normalize("PyYAML")
    ('scikit-image', 'torch', 'pyyaml')
    """
    key = re.sub(r"[-_.]+", "-", name).lower()
    return CONDA_ALIASES.get(key, key)


@dataclass
class Entry:
    """One package line of an environment file."""

    name: str  # normalised pip name
    raw: str  # the line as written
    spec: SpecifierSet | None  # None: no version given, or unreadable (see ``unreadable``)
    extras: frozenset[str] = frozenset()
    source: str = "conda"  # "conda" | "pip"
    unreadable: str | None = None  # why the version part could not be read


@dataclass
class EnvFile:
    """An environment file: its package entries (conda and pip sections)."""

    path: Path
    entries: list[Entry] = field(default_factory=list)

    def by_name(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for e in self.entries:
            out.setdefault(e.name, []).append(e)
        return out


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------- reading
def read_pyproject(path: str | Path) -> dict[str, dict[str, Requirement]]:
    """Groups of ``pyproject.toml`` -> {normalised name: Requirement}.

    Groups: ``core`` (project.dependencies), each optional-dependencies extra,
    ``build`` (build-system.requires) and ``python`` (requires-python, as a
    Requirement on ``python``).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "a pyproject.toml", "no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(path, "valid TOML", f"a syntax error ({e})") from None
    project = data.get("project")
    if not isinstance(project, dict):
        raise InputError(path, "a [project] table", "none")
    groups: dict[str, list[str]] = {"core": project.get("dependencies", [])}
    groups.update(project.get("optional-dependencies", {}))
    groups["build"] = data.get("build-system", {}).get("requires", [])
    out: dict[str, dict[str, Requirement]] = {}
    for group, lines in groups.items():
        reqs: dict[str, Requirement] = {}
        for line in lines:
            try:
                req = Requirement(line)
            except InvalidRequirement as e:
                raise InputError(path, f"PEP 508 requirements in group {group!r}", f"{line!r} ({e})") from None
            if req.marker is not None and not req.marker.evaluate({"extra": group}):
                continue  # not for this platform / interpreter
            reqs[normalize(req.name)] = req
        out[group] = reqs
    if "requires-python" in project:
        out["python"] = {"python": Requirement(f"python{project['requires-python']}")}
    return out


def conda_spec(text: str) -> SpecifierSet:
    """A conda match spec's version part as a PEP 440 SpecifierSet.

    >>> str(conda_spec("=3.11")), str(conda_spec(">=4.2,<5")), str(conda_spec("2.4.*"))
    ('==3.11.*', '<5,>=4.2', '==2.4.*')
    >>> str(conda_spec("==2.13.0")), str(conda_spec("=1.0=py311_0"))
    ('==2.13.0', '==1.0.*')
    """
    text = text.strip()
    if "|" in text or "[" in text:
        raise InvalidSpecifier(f"{text!r}: 'or' and bracket specs are not supported")
    if text.startswith("=") and not text.startswith("=="):
        version = text[1:].split("=")[0].strip()  # drop a build string: =1.0=py311_0
        return SpecifierSet(f"=={version.rstrip('*').rstrip('.')}.*")
    if " " in text and not re.search(r"[<>=!~]", text.split()[0]):
        text = text.split()[0]  # "1.26.* py311*": version then build
    parts = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not re.match(r"[<>=!~]", part):  # bare version: exact, or a wildcard
            part = f"=={part}"
        if part.endswith("*") and not part.endswith(".*"):
            part = part[:-1].rstrip(".") + ".*"
        parts.append(part)
    return SpecifierSet(",".join(parts))


def _conda_entry(line: str) -> Entry:
    body = line.split("::", 1)[-1].strip()  # drop a channel prefix (conda-forge::numpy)
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*(.*)$", body)
    if not m:
        return Entry(name=body, raw=line, spec=None, unreadable="not a package spec")
    name, rest = m.group(1), m.group(2).strip()
    try:
        spec = conda_spec(rest) if rest else None
        return Entry(name=normalize(name), raw=line, spec=spec)
    except InvalidSpecifier as e:
        return Entry(name=normalize(name), raw=line, spec=None, unreadable=str(e))


def _pip_entry(line: str) -> Entry | None:
    line = line.split(" #", 1)[0].strip()
    if not line or line.startswith("-") or line.startswith(".") or "://" in line or line.startswith("/"):
        return None  # options (--extra-index-url, -e .), local paths and URLs are not package requirements
    try:
        req = Requirement(line)
    except InvalidRequirement as e:
        return Entry(name=line, raw=line, spec=None, source="pip", unreadable=str(e))
    return Entry(name=normalize(req.name), raw=line, spec=req.specifier if str(req.specifier) else None,
                 extras=frozenset(req.extras), source="pip")


def read_env_file(path: str | Path) -> EnvFile:
    """Parse a conda environment file (``dependencies:`` with an optional ``pip:`` list)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "a conda environment file", "no such file") from None
    except yaml.YAMLError as e:
        raise InputError(path, "valid YAML", f"a syntax error ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("dependencies"), list):
        found = "no 'dependencies' list" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise InputError(path, "a mapping with a 'dependencies' list", found)
    env = EnvFile(path)
    for item in data["dependencies"]:
        if isinstance(item, str):
            env.entries.append(_conda_entry(item))
        elif isinstance(item, dict) and set(item) == {"pip"} and isinstance(item["pip"], list):
            for line in item["pip"]:
                if not isinstance(line, str):
                    raise InputError(path, "strings in the pip list", repr(line))
                entry = _pip_entry(line)
                if entry is not None:
                    env.entries.append(entry)
        else:
            raise InputError(path, "package strings or one {'pip': [...]} list in 'dependencies'", repr(item))
    return env


# --------------------------------------------------------------------------- comparing
def _candidates(spec: SpecifierSet) -> set[Version]:
    """Versions named by ``spec`` and their immediate neighbours (see module docstring)."""
    out: set[Version] = set()
    for s in spec:
        text = s.version.rstrip("*").rstrip(".")
        try:
            v = Version(text)
        except InvalidVersion:
            continue
        rel = list(v.release)
        out.add(v)
        out.add(Version(".".join(map(str, rel + [1]))))  # just above (2.0 -> 2.0.1)
        bumped = rel[:-1] + [rel[-1] + 1]
        out.add(Version(".".join(map(str, bumped))))  # next release (2.0 -> 2.1)
        if rel[-1] > 0:
            below = rel[:-1] + [rel[-1] - 1]
            out.add(Version(".".join(map(str, below)) + ".999"))  # just below (2.1 -> 2.0.999)
        if v.local:
            out.add(Version(v.public))
    return out


def compatible(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether some version satisfies both specifier sets (pre-releases allowed)."""
    if not str(a) or not str(b):
        return True
    return any(a.contains(v, prereleases=True) and b.contains(v, prereleases=True)
               for v in _candidates(a) | _candidates(b))


def check_env(env: EnvFile, pyproject: dict[str, dict[str, Requirement]], required_groups: tuple[str, ...],
              required_single: tuple[str, ...] = (), label: str | None = None) -> Report:
    """Compare one environment file with pyproject; see module docstring for the rules."""
    label = label or str(env.path)
    report = Report()
    known: dict[str, list[tuple[str, Requirement]]] = {}
    for group, reqs in pyproject.items():
        for name, req in reqs.items():
            known.setdefault(name, []).append((group, req))
    required = {name: req for g in required_groups for name, req in pyproject.get(g, {}).items()}
    for name in required_single:
        for group, req in known.get(normalize(name), []):
            required.setdefault(normalize(name), req)
    listed = env.by_name()

    for name in sorted(required):
        if name not in listed:
            groups = ", ".join(g for g, _ in known[name])
            report.errors.append(f"{label}: missing {name!r} (pyproject {groups}: {required[name]})")
    for name, entries in sorted(listed.items()):
        if len(entries) > 1:
            report.warnings.append(f"{label}: {name!r} listed {len(entries)} times ({'; '.join(e.raw for e in entries)})")
        for e in entries:
            if e.unreadable:
                report.warnings.append(f"{label}: cannot read the version of {e.raw!r} ({e.unreadable}); not checked")
            if name not in known:
                if name not in TOOLING:
                    report.warnings.append(f"{label}: {e.raw!r} is not a dependency in pyproject.toml")
                continue
            for group, req in known[name]:
                what = f"pyproject {group}: {req}"
                if e.spec is not None and not compatible(e.spec, req.specifier):
                    report.errors.append(f"{label}: {e.raw!r} contradicts {what}")
                lost = set(req.extras) - set(e.extras)
                if lost and (group in required_groups or name in map(normalize, required_single)):
                    how = " (extras need the pip section)" if e.source == "conda" else ""
                    report.errors.append(f"{label}: {e.raw!r} lacks the extras [{','.join(sorted(lost))}] of {what}{how}")
    if "python" in pyproject and "python" not in listed:
        report.warnings.append(f"{label}: no python version given (pyproject requires-python {pyproject['python']['python'].specifier})")
    return report


def check(root: str | Path) -> Report:
    """Check every environment file under ``root`` against ``root/pyproject.toml``."""
    root = Path(root)
    report = Report()
    pyproject = read_pyproject(root / "pyproject.toml")
    for rel, (groups, singles) in ENV_FILES.items():
        try:
            env = read_env_file(root / rel)
        except InputError as e:
            report.errors.append(str(e))
            continue
        sub = check_env(env, pyproject, groups, singles, label=rel)
        report.errors += sub.errors
        report.warnings += sub.warnings
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m screener_nb envcheck [--root PATH]``: 0 when consistent, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m screener_nb envcheck",
                                     description="Check pyproject.toml against environment.yml and binder/environment.yml.")
    parser.add_argument("--root", default=None,
                        help="repository root holding pyproject.toml (default: the one this package lives in)")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else Path(__file__).resolve().parents[1]
    try:
        report = check(root)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in report.warnings:
        print(f"warning: {w}")
    for e in report.errors:
        print(f"error: {e}")
    files = ", ".join(["pyproject.toml", *ENV_FILES])
    if report.ok:
        print(f"envcheck: {files} are consistent ({len(report.warnings)} warning(s))")
        return 0
    print(f"envcheck: {len(report.errors)} inconsistency(ies) between {files}")
    return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CONDA_ALIASES", "ENV_FILES", "Entry", "EnvFile", "Report", "normalize", "read_pyproject",
           "conda_spec", "read_env_file", "compatible", "check_env", "check", "main"]
