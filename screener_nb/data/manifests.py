"""Dataset manifests: what each public dataset of the paper is and how to find it on disk.

One YAML file per dataset in ``data_manifests/`` (NLST, AMOS, AbdomenAtlas for
training; LIDC-IDRI, MIDRC-RICORD-1a, KiTS21, LiTS for testing) records its
homepage, licence, citation, role, label semantics, known quirks, the number of
cases the paper used, and the expected local layout under
``$SCREENER_DATA_DIR/<layout.folder>``. The datasets are large and behind
registration: users download them, the manifest tells the package how to pair
images with labels.

Layout fields (all paths relative to the dataset folder, POSIX separators):

- ``images``: a glob (``**`` allowed) matching image files, or DICOM series
  folders when ``image_format`` is ``dicom_dir``.
- ``id_regex``: a regex searched in each matched path; its named groups
  (e.g. ``id``, ``split``) feed the two templates below.
- ``case_id``: a ``str.format`` template of the case id (``"kits21_{id}"``).
- ``labels``: a glob template of the label (``"labels{split}/{id}.nii.gz"``)
  or null. Besides the regex groups it may use ``{image}`` (the image's
  relative path), ``{image_dir}`` and ``{image_name}``. No match = no label;
  several matches = error.
- ``exclude_regex`` (optional): matched image paths to drop (AMOS's MRIs).

Manifests are searched in ``$SCREENER_MANIFEST_DIR`` (if set), then in the
repository's ``data_manifests/`` next to the package, then in
``screener_nb/data_manifests`` (for an installed package that ships them).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import InputError

DATA_DIR_ENV = "SCREENER_DATA_DIR"
MANIFEST_DIR_ENV = "SCREENER_MANIFEST_DIR"

#: YAML files in the manifest folder that are not dataset manifests (their own schemas).
NOT_DATASETS = frozenset({"samples", "phantoms"})
ROLES = ("train", "test", "calib")  # calib: healthy scans held out for label-free thresholds
IMAGE_FORMATS = ("nifti", "nrrd", "dicom_dir")


# --------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class Layout:
    """Where a dataset's files lie under ``$SCREENER_DATA_DIR/<folder>`` (see module docstring)."""

    folder: str
    images: str
    id_regex: str
    case_id: str = "{id}"
    labels: str | None = None
    image_format: str = "nifti"
    exclude_regex: str | None = None
    pairing: str = ""


@dataclass(frozen=True)
class LabelSpec:
    """Label semantics. ``target``: label values that are the pathology the test set is about
    (empty for training data); ``values``: every label value and its meaning."""

    kind: str
    target: tuple[int, ...]
    description: str
    values: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """One public dataset of the paper (fields as in the YAML; ``path`` is the YAML file)."""

    name: str
    description: str
    homepage: str
    licence: str
    citation: str
    role: str
    modality: str
    layout: Layout
    labels: LabelSpec
    quirks: tuple[str, ...]
    n_cases: int
    path: Path
    download: str | None = None
    uncertain: tuple[str, ...] = ()
    label_fixes: tuple[dict, ...] = ()

    def label_fixes_for(self, case_id: str) -> list[dict]:
        """The fixes (e.g. ``{"flip_axis": 0}``) to apply to this case's label as read from its file."""
        return [f for f in self.label_fixes if case_id in f["cases"]]


class CaseFiles(NamedTuple):
    """A case found on disk: id, image file (or DICOM folder), label file or None."""

    case_id: str
    image: Path
    label: Path | None


@dataclass
class DatasetStatus:
    """One row of :func:`check`: is the dataset present, and how many cases were found."""

    name: str
    role: str
    folder: Path | None
    present: bool
    n_found: int
    n_labelled: int
    n_paper: int | None
    note: str = ""


# --------------------------------------------------------------------------- locating manifests
def manifest_dirs() -> list[Path]:
    """Folders searched for manifests, in order (existing ones only)."""
    candidates = []
    env = os.environ.get(MANIFEST_DIR_ENV)
    if env:
        candidates.append(Path(env).expanduser())
    here = Path(__file__).resolve()
    candidates.append(here.parents[2] / "data_manifests")  # repository checkout / editable install
    candidates.append(here.parents[1] / "data_manifests")  # shipped inside the package
    seen, out = set(), []
    for c in candidates:
        if c.is_dir() and c.resolve() not in seen:
            seen.add(c.resolve())
            out.append(c)
    return out


def manifest_path(name: str) -> Path:
    """The YAML file of manifest ``name`` (first folder of :func:`manifest_dirs` that has it)."""
    for d in manifest_dirs():
        for suffix in (".yaml", ".yml"):
            p = d / f"{name}{suffix}"
            if p.is_file():
                return p
    raise InputError(
        f"dataset manifest {name!r}",
        f"one of the known datasets: {', '.join(list_manifests()) or '(none found)'}",
        f"no {name}.yaml in {', '.join(map(str, manifest_dirs())) or 'any manifest folder'}",
    )


def list_manifests() -> list[str]:
    """Names of the dataset manifests available (``samples`` and ``phantoms`` excluded)."""
    names = set()
    for d in manifest_dirs():
        for p in list(d.glob("*.yaml")) + list(d.glob("*.yml")):
            if p.stem not in NOT_DATASETS and not p.stem.startswith("."):
                names.add(p.stem)
    return sorted(names)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is an :class:`InputError` naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "a YAML file", "no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(path, "valid YAML", f"a parse error ({e})") from e


# --------------------------------------------------------------------------- validation
_TOP = {  # field -> (type, description)
    "name": (str, "a string"),
    "description": (str, "a string"),
    "homepage": (str, "a URL string"),
    "licence": (str, "a string"),
    "citation": (str, "a string"),
    "role": (str, "'train' or 'test'"),
    "modality": (str, "a string ('CT')"),
    "layout": (dict, "a mapping"),
    "labels": (dict, "a mapping"),
    "quirks": (list, "a list of strings"),
    "n_cases": (int, "an integer"),
}
_LAYOUT = {"folder": (str, "a string"), "images": (str, "a glob string"), "id_regex": (str, "a regex string")}
_LABELS = {"kind": (str, "a string"), "target": (list, "a list of label values"), "description": (str, "a string")}


def _found(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def _require(data: dict, spec: dict, path: Path, prefix: str = "") -> None:
    for key, (typ, what) in spec.items():
        if key not in data or data[key] is None:
            raise InputError(path, f"field '{prefix}{key}' ({what})", "no such field")
        value = data[key]
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise InputError(path, f"field '{prefix}{key}' to be {what}", _found(value))


def _optional_str(data: dict, key: str, path: Path, prefix: str = "") -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise InputError(path, f"field '{prefix}{key}' to be a string or null", _found(value))
    return value


def _compile(pattern: str, path: Path, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InputError(path, f"field '{key}' to be a valid regex", f"{pattern!r} ({e})") from e


def parse_manifest(data: Any, path: str | Path) -> Manifest:
    """Validate the parsed YAML ``data`` of the manifest file ``path`` and build a :class:`Manifest`."""
    path = Path(path)
    if not isinstance(data, dict):
        raise InputError(path, "a YAML mapping of manifest fields", _found(data))
    _require(data, _TOP, path)
    if data["role"] not in ROLES:
        raise InputError(path, f"field 'role' to be one of {ROLES}", repr(data["role"]))
    if data["n_cases"] < 0:
        raise InputError(path, "field 'n_cases' >= 0", str(data["n_cases"]))
    if not all(isinstance(q, str) for q in data["quirks"]):
        raise InputError(path, "field 'quirks' to be a list of strings", _found(data["quirks"]))
    if data["name"] != path.stem:
        raise InputError(path, f"field 'name' equal to the file name {path.stem!r}", repr(data["name"]))

    lay = data["layout"]
    _require(lay, _LAYOUT, path, "layout.")
    fmt = lay.get("image_format", "nifti")
    if fmt not in IMAGE_FORMATS:
        raise InputError(path, f"field 'layout.image_format' to be one of {IMAGE_FORMATS}", repr(fmt))
    id_re = _compile(lay["id_regex"], path, "layout.id_regex")
    if not id_re.groupindex:
        raise InputError(path, "field 'layout.id_regex' with named groups, e.g. (?P<id>...)", repr(lay["id_regex"]))
    exclude = _optional_str(lay, "exclude_regex", path, "layout.")
    if exclude:
        _compile(exclude, path, "layout.exclude_regex")
    case_id = _optional_str(lay, "case_id", path, "layout.") or "{id}"
    labels_tpl = _optional_str(lay, "labels", path, "layout.")
    allowed = set(id_re.groupindex) | {"image", "image_dir", "image_name"}
    for key, tpl in (("case_id", case_id), ("labels", labels_tpl)):
        if tpl is None:
            continue
        used = {m.group(1) for m in re.finditer(r"\{(\w+)[^}]*\}", tpl)}
        if not used <= allowed:
            raise InputError(path, f"field 'layout.{key}' using only the placeholders {sorted(allowed)}",
                             f"{tpl!r} (unknown: {sorted(used - allowed)})")
    layout = Layout(
        folder=lay["folder"], images=lay["images"], id_regex=lay["id_regex"], case_id=case_id,
        labels=labels_tpl, image_format=fmt, exclude_regex=exclude,
        pairing=str(lay.get("pairing", "") or "").strip(),
    )

    lab = data["labels"]
    _require(lab, _LABELS, path, "labels.")
    target = lab["target"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in target):
        raise InputError(path, "field 'labels.target' to be a list of integer label values", _found(target))
    values = lab.get("values") or {}
    if not isinstance(values, dict) or not all(isinstance(k, int) for k in values):
        raise InputError(path, "field 'labels.values' to be a mapping {int: meaning}", _found(values))
    labels = LabelSpec(kind=lab["kind"], target=tuple(target), description=lab["description"].strip(),
                       values={int(k): str(v) for k, v in values.items()})

    fixes = data.get("label_fixes") or []
    if not isinstance(fixes, list) or not all(isinstance(f, dict) and isinstance(f.get("cases"), list) for f in fixes):
        raise InputError(path, "field 'label_fixes' to be a list of {cases: [...], flip_axis: int}", _found(fixes))
    for f in fixes:
        if not isinstance(f.get("flip_axis"), int):
            raise InputError(path, "an integer 'flip_axis' in every label_fixes entry", _found(f))
    uncertain = data.get("uncertain") or []
    if not isinstance(uncertain, list):
        raise InputError(path, "field 'uncertain' to be a list of strings", _found(uncertain))

    return Manifest(
        name=data["name"], description=data["description"].strip(), homepage=data["homepage"],
        licence=data["licence"], citation=" ".join(data["citation"].split()), role=data["role"],
        modality=data["modality"], layout=layout, labels=labels,
        quirks=tuple(" ".join(q.split()) for q in data["quirks"]), n_cases=int(data["n_cases"]), path=path,
        download=_optional_str(data, "download", path), uncertain=tuple(map(str, uncertain)),
        label_fixes=tuple(fixes),
    )


def load_manifest(name_or_path: str | Path | Manifest) -> Manifest:
    """Load and validate a dataset manifest by name (``"kits21"``) or YAML path.

    Raises:
        InputError: unknown name (the message lists the known ones), unreadable
            YAML, or a missing/mistyped field (the message names the file and the field).
    """
    if isinstance(name_or_path, Manifest):
        return name_or_path
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        path = Path(name_or_path)
    else:
        path = manifest_path(text)
    return parse_manifest(read_yaml(path), path)


# --------------------------------------------------------------------------- finding cases
def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else ``$SCREENER_DATA_DIR``; an error says which variable to set."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if not env:
        raise InputError(
            DATA_DIR_ENV,
            f"the environment variable {DATA_DIR_ENV} set to the folder holding the datasets"
            f" (or data_dir=...)",
            "it unset",
        )
    return Path(env).expanduser()


def find_cases(manifest: str | Path | Manifest, data_dir: str | Path | None = None) -> list[CaseFiles]:
    """Pair images with labels for one dataset under ``data_dir/<layout.folder>``.

    Args:
        manifest: a :class:`Manifest`, its name or its YAML path.
        data_dir: the folder holding the datasets; default ``$SCREENER_DATA_DIR``.

    Returns:
        ``CaseFiles(case_id, image, label | None)`` sorted by case id. When two
        images yield the same id (e.g. an LIDC patient with two series), the
        later ones (in path order) get ``_2``, ``_3``... appended.

    Raises:
        InputError: ``data_dir`` unset (names the variable), dataset folder
            missing, a label template matching several files.
    """
    m = load_manifest(manifest)
    lay = m.layout
    root = resolve_data_dir(data_dir) / lay.folder
    if not root.is_dir():
        raise InputError(root, f"the {m.name} dataset folder ({m.homepage}; layout: {lay.images})",
                         "no such folder")
    id_re = re.compile(lay.id_regex)
    exclude = re.compile(lay.exclude_regex) if lay.exclude_regex else None
    want_dir = lay.image_format == "dicom_dir"
    cases: list[CaseFiles] = []
    seen: dict[str, int] = {}
    for image in sorted(root.glob(lay.images)):
        if (image.is_dir() != want_dir) or image.name.startswith("."):
            continue
        rel = image.relative_to(root).as_posix()
        if exclude and exclude.search(rel):
            continue
        match = id_re.search(rel)
        if not match:
            continue
        fields = {k: (v or "") for k, v in match.groupdict().items()}
        image_dir = Path(rel).parent.as_posix()
        fields.update(image=glob_escape(rel), image_dir=glob_escape(image_dir), image_name=glob_escape(image.name))
        case_id = lay.case_id.format(**fields)
        label = None
        if lay.labels:
            hits = sorted(p for p in root.glob(lay.labels.format(**fields)) if p.is_file())
            if len(hits) > 1:
                raise InputError(image, f"at most one label matching {lay.labels!r} in {root}",
                                 f"{len(hits)}: {', '.join(str(h.relative_to(root)) for h in hits[:4])}")
            label = hits[0] if hits else None
        n = seen.get(case_id, 0) + 1
        seen[case_id] = n
        cases.append(CaseFiles(case_id if n == 1 else f"{case_id}_{n}", image, label))
    return sorted(cases, key=lambda c: c.case_id)


def glob_escape(text: str) -> str:
    """Escape glob metacharacters so a literal path part can go into a glob template."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def apply_label_fixes(manifest: str | Path | Manifest, case_id: str, label: np.ndarray) -> np.ndarray:
    """Apply the manifest's ``label_fixes`` for ``case_id`` (e.g. LiTS 48-52: flip axis 0).

    ``label`` is the array as stored in the file (before any reorientation).
    """
    m = load_manifest(manifest)
    for fix in m.label_fixes_for(case_id):
        label = np.flip(label, axis=int(fix["flip_axis"]))
    return label


__all__ = [
    "Manifest", "Layout", "LabelSpec", "CaseFiles", "DatasetStatus", "load_manifest", "parse_manifest",
    "list_manifests", "manifest_dirs", "resolve_data_dir", "find_cases", "apply_label_fixes",
    "DATA_DIR_ENV", "MANIFEST_DIR_ENV",
]
