"""The model folder's contract: ``manifest.json`` as one typed object, written by ``training/export.py`` and read
by ``service/model.py``.

Owns: the format tag, the fields both sides rely on and their JSON form, and the checksums of the folder's
files. Does not know: ONNX Runtime, torch, or what the export's free-form records (config, metrics, parity) say.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "dnr-reranker/v1"


class ModelError(RuntimeError):
    """The model folder does not match its contract; the message says which part."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: list[str | int]


@dataclass(frozen=True)
class Graph:
    file: str
    opset: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    masked_logit: float = -1e4
    positions: str = "derived in the graph from scores (descending, ties by lower index)"


@dataclass(frozen=True)
class Items:
    """``file`` holds the raw item ids in index order, the first at ``first_index``."""

    file: str
    count: int
    pad_index: int
    oov_index: int
    first_index: int


@dataclass(frozen=True)
class ProfileField:
    """A categorical user field; value ``vocab[i]`` is index ``i + 1`` (0 = unknown)."""

    name: str
    vocab: list[str]


@dataclass(frozen=True)
class Manifest:
    """What a model version promises. ``files`` maps every file in the folder to its sha256 and size;
    ``records`` holds the export's free-form sections (dataset, config, metrics, parity, ...) unchanged."""

    version: str
    created_at: str
    graph: Graph
    max_candidates: int
    history_len: int
    score_range: tuple[float, float]
    items: Items
    profile_fields: list[ProfileField]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "created_at": self.created_at,
                "graph": {"file": self.graph.file, "opset": self.graph.opset,
                          "inputs": [vars(t) for t in self.graph.inputs],
                          "outputs": [vars(t) for t in self.graph.outputs],
                          "positions": self.graph.positions, "masked_logit": self.graph.masked_logit},
                "max_candidates": self.max_candidates, "history_len": self.history_len,
                "score_range": list(self.score_range), "items": vars(self.items),
                "profile_fields": [vars(f) for f in self.profile_fields], **self.records, "files": self.files}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "manifest") -> Manifest:
        """The manifest in ``obj``, or ModelError naming the first thing missing or of the wrong kind."""
        if obj.get("format") != FORMAT:
            raise ModelError(f"{where}: format {obj.get('format')!r}, this service reads {FORMAT!r}")
        known = {"format", "version", "created_at", "graph", "max_candidates", "history_len", "score_range", "items",
                 "profile_fields", "files"}
        for key in sorted(known - {"created_at"}):
            if key not in obj:
                raise ModelError(f"{where}: missing key {key!r}")
        try:
            g = obj["graph"]
            graph = Graph(str(g["file"]), int(g.get("opset", 0)), [Tensor(**t) for t in g.get("inputs", [])],
                          [Tensor(**t) for t in g.get("outputs", [])], float(g.get("masked_logit", -1e4)),
                          str(g.get("positions", Graph.positions)))
            low, high = obj["score_range"]
            return cls(version=str(obj["version"]), created_at=str(obj.get("created_at", "")), graph=graph,
                       max_candidates=int(obj["max_candidates"]), history_len=int(obj["history_len"]),
                       score_range=(float(low), float(high)), items=Items(**obj["items"]),
                       profile_fields=[ProfileField(str(f["name"]), [str(v) for v in f["vocab"]])
                                       for f in obj["profile_fields"]],
                       files=dict(obj["files"]), records={k: v for k, v in obj.items() if k not in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: malformed field ({type(exc).__name__}: {exc})") from None

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """``folder/manifest.json``, checked: format, fields, and every listed file against its checksum."""
        path = folder / "manifest.json"
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: no manifest") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: unreadable manifest ({exc})") from None
        if not isinstance(obj, dict):
            raise ModelError(f"{path}: not a JSON object")
        manifest = cls.from_json(obj, str(path))
        for name, meta in manifest.files.items():
            file = folder / name
            if not file.is_file():
                raise ModelError(f"{file}: listed in the manifest but missing")
            if sha256(file) != meta.get("sha256"):
                raise ModelError(f"{file}: sha256 does not match the manifest")
        for name in (manifest.graph.file, manifest.items.file):
            if name not in manifest.files:
                raise ModelError(f"{path}: {name} has no checksum in the manifest")
        return manifest

    def write(self, folder: Path) -> Manifest:
        """Checksum every file now in ``folder`` and write ``manifest.json`` there; the manifest written."""
        files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
        done = Manifest(**{**vars(self), "files": files})
        (folder / "manifest.json").write_text(json.dumps(done.to_json(), indent=2))
        return done
