"""The dataset registry (YAML, no code edits) and ``name%X`` mixtures.

``datasets.yaml``::

    shapes_train:
      annotation_path: train.jsonl   # .json (a list) or .jsonl; relative to this YAML file
      data_path: .                   # folder media paths are relative to; relative to this file

``dataset_use: "shapes_train%50,docs%250"`` takes 50 % of one and 2.5 copies of the other.
The draw is seeded by (seed, name) only, so every process of a multi-GPU run gets the same
list (the official code's unseeded ``random.sample`` does not). A plain path to a .json/.jsonl
file works as a name too (its folder is the data_path).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError

DEFAULT_REGISTRY = "datasets.yaml"
_USE_RE = re.compile(r"^(?P<name>.+?)(?:%(?P<pct>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    annotation_path: Path
    data_path: Path


@dataclass(frozen=True)
class RawRecord:
    """One annotation record with where it came from."""

    raw: object
    data_path: Path
    dataset: str
    index: int  # index inside its annotation file

    @property
    def origin(self) -> str:
        return f"{self.dataset}:{self.index}"


def registry_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("QVL_DATASETS", DEFAULT_REGISTRY))


def load_registry(path: str | os.PathLike | None = None) -> dict[str, DatasetEntry]:
    import yaml

    path = registry_path(path)
    if not path.is_file():
        raise QvlError(f"dataset registry {path} not found",
                       fix="pass --registry FILE, set QVL_DATASETS, or create datasets.yaml (see docs/data.md)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QvlError(f"invalid YAML: {e}", where=str(path)) from None
    if isinstance(data, dict) and isinstance(data.get("datasets"), dict):
        data = data["datasets"]
    if not isinstance(data, dict):
        raise QvlError("registry must map dataset names to {annotation_path, data_path}", where=str(path))
    base = path.resolve().parent
    entries = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or "annotation_path" not in spec:
            raise QvlError(f"dataset {name!r} needs an annotation_path", where=str(path),
                           fix=f"{name}:\n  annotation_path: train.jsonl\n  data_path: images/")
        if "%" in str(name):
            raise QvlError(f"dataset name {name!r} contains '%'", where=str(path), fix="'%' is reserved for sampling")
        ann = base / Path(spec["annotation_path"]).expanduser()
        data_path = base / Path(str(spec.get("data_path") or ann.parent)).expanduser()
        entries[str(name)] = DatasetEntry(str(name), ann, data_path)
    return entries


def parse_use(spec: str | list[str]) -> list[tuple[str, float]]:
    """'a%50,b' -> [('a', 50.0), ('b', 100.0)]."""
    items = spec if isinstance(spec, list) else [s for s in str(spec).split(",")]
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        m = _USE_RE.match(item)
        pct = float(m.group("pct")) if m.group("pct") else 100.0
        if pct <= 0:
            raise QvlError(f"{item!r}: sampling percentage must be > 0", where="dataset_use")
        out.append((m.group("name"), pct))
    if not out:
        raise QvlError("dataset_use is empty", fix="name at least one dataset, e.g. dataset_use=shapes_train")
    return out


def read_annotations(path: Path) -> list:
    """Records of a .json (list) or .jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise QvlError(f"annotation file {path} not found", fix="check annotation_path in the registry")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise QvlError(f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})", where=str(path),
                               fix="one JSON object per line") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise QvlError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", where=str(path)) from None
    if not isinstance(data, list):
        raise QvlError("a .json annotation file must hold a list of samples", where=str(path))
    return data


def sample_indices(n: int, pct: float, seed: int, name: str) -> list[int]:
    """Seeded draw of pct% of range(n); pct > 100 repeats the data (whole copies + a seeded remainder)."""
    rng = random.Random(f"qvl:{seed}:{name}")  # str seeds hash with sha512: stable across processes
    copies, frac = divmod(pct, 100.0)
    out = list(range(n)) * int(copies)
    k = round(n * frac / 100.0)
    out.extend(sorted(rng.sample(range(n), k)))
    return out


def resolve_use(name: str, registry: dict[str, DatasetEntry] | None) -> DatasetEntry:
    if registry and name in registry:
        return registry[name]
    p = Path(name).expanduser()
    if p.suffix in (".json", ".jsonl") and p.is_file():
        return DatasetEntry(name, p, p.resolve().parent)
    known = ", ".join(sorted(registry or {})) or "(registry empty or not loaded)"
    raise QvlError(f"unknown dataset {name!r}", where="dataset_use",
                   fix=f"register it in datasets.yaml or pass a .json/.jsonl path; known: {known}")


def load_mixture(use: str | list[str], registry: dict[str, DatasetEntry] | None = None, seed: int = 42) -> list[RawRecord]:
    """All records named by ``dataset_use``, sampled as asked, in a deterministic order."""
    records: list[RawRecord] = []
    for name, pct in parse_use(use):
        entry = resolve_use(name, registry)
        data = read_annotations(entry.annotation_path)
        for i in sample_indices(len(data), pct, seed, name):
            records.append(RawRecord(data[i], entry.data_path, name, i))
    return records
