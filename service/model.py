"""One exported model version: manifest validation, the ONNX Runtime session, encoding and inference.

Owns: checking ``models/<version>/`` against its manifest and checksums, the execution providers (and
which one really runs), raw ids -> indices, padding a batch, and top-k. Synchronous and pure: arrays
in, scores out, one row per request. Does not know: asyncio, HTTP, Redis or batching policy.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import Manifest, ModelError

log = logging.getLogger("rerank.model")

# What this service feeds: name -> ONNX Runtime type string. A model that wants anything else is refused.
EXPECTED_INPUTS = {"items": "tensor(int64)", "scores": "tensor(float)", "mask": "tensor(bool)",
                   "history": "tensor(int64)", "profile": "tensor(int64)"}
EXPECTED_OUTPUT = ("logits", "tensor(float)")


@dataclass(frozen=True)
class UserFeatures:
    """Raw, model-independent user features: profile values by field name, item ids oldest first."""

    profile: dict[str, str]
    history: tuple[str, ...]


COLD_START = UserFeatures({}, ())


@dataclass(frozen=True)
class Job:
    """One request as the model sees it: candidates in request order."""

    item_ids: list[str]
    scores: np.ndarray  # (n,) float32
    features: UserFeatures
    k: int


@dataclass(frozen=True)
class Ranked:
    """Top-k of one request: candidate positions (into the request's list) and their logits."""

    positions: np.ndarray  # (k,) int
    logits: np.ndarray  # (k,) float32
    oov_items: int
    version: str  # the model version that ranked it
    started: float = 0.0  # when the model call that ranked it began (time.monotonic)
    run_s: float = 0.0  # how long that call's encoding and inference took (the whole batch's)


def resolve_providers(choice: str) -> list[str]:
    """'cuda' and 'auto' ask for CUDA first when this onnxruntime build has it; CPU is always last (it runs the
    few operators CUDA lacks). Whether CUDA really runs is known only from the session: see RerankModel."""
    if choice in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class RerankModel:
    """A validated, warmed-up model version. Thread-safe for ``rank`` (ONNX Runtime's ``run`` is)."""

    def __init__(self, folder: Path, providers: str = "auto", intra_op_threads: int = 0) -> None:
        self.folder = folder
        self.manifest = m = Manifest.read(folder)
        self.version = m.version
        self.max_candidates = m.max_candidates
        self.history_len = m.history_len
        self.score_range = m.score_range
        raw_ids = json.loads((folder / m.items.file).read_text())
        if len(raw_ids) != m.items.count:
            raise ModelError(f"{folder}: items file has {len(raw_ids)} ids, manifest says {m.items.count}")
        self.oov_index = m.items.oov_index
        self.item_index = {str(raw): i + m.items.first_index for i, raw in enumerate(raw_ids)}
        self.profile_fields = [f.name for f in m.profile_fields]
        self.profile_index = [{v: i + 1 for i, v in enumerate(f.vocab)} for f in m.profile_fields]

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # Idle ORT threads spin by default; on a machine shared with the event loop that burns the very
        # cores the HTTP path needs (measured: +19% saturated throughput without it on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(folder / m.graph.file), options,
                                                providers=resolve_providers(providers))
        except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
            raise ModelError(f"{folder / m.graph.file}: ONNX Runtime refused the graph ({exc})") from None
        got = {i.name: i.type for i in self.session.get_inputs()}
        if got != EXPECTED_INPUTS:
            raise ModelError(f"{folder}: graph inputs {got} differ from what the service feeds {EXPECTED_INPUTS}")
        declared = [t.name for t in m.graph.inputs]
        if declared != list(got):
            raise ModelError(f"{folder}: the manifest declares inputs {declared}, the graph has {list(got)}: "
                             "mismatched artifacts")
        out = self.session.get_outputs()[0]
        if (out.name, out.type) != EXPECTED_OUTPUT:
            raise ModelError(f"{folder}: graph output {(out.name, out.type)} is not {EXPECTED_OUTPUT}")
        # What really runs: the requested list minus what failed to initialise.
        self.providers: list[str] = self.session.get_providers()
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        if providers == "cuda" and not self.on_gpu:
            # An explicit cuda that silently ran on CPU would cost 2-3x the cores per request and go unnoticed
            # (a CUDA 12 image with onnxruntime-gpu 1.31 did exactly that); auto is the lenient choice.
            raise ModelError(f"RERANK_PROVIDERS=cuda but ONNX Runtime runs {self.providers} (its build offers "
                             f"{ort.get_available_providers()}): is onnxruntime-gpu installed in place of "
                             "onnxruntime, a GPU visible, and are CUDA 13 and cuDNN 9 on the library path? "
                             "RERANK_PROVIDERS=auto falls back to CPU instead")

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> float:
        """Run dummy batches of full-length lists so the first real request pays no allocation; seconds."""
        t0 = time.perf_counter()
        known = next(iter(self.item_index), "")
        for b in batch_sizes:
            n = self.max_candidates
            jobs = [Job([known] * n, np.linspace(1, 0, n, dtype=np.float32), UserFeatures({}, (known,)), 1)] * b
            self.rank(jobs)
        return time.perf_counter() - t0

    def encode(self, jobs: list[Job]) -> tuple[dict[str, np.ndarray], list[int]]:
        """Pad ``jobs`` into one feed; also returns each job's count of out-of-vocabulary items."""
        b = len(jobs)
        n = max(len(j.item_ids) for j in jobs)
        items = np.zeros((b, n), dtype=np.int64)
        scores = np.zeros((b, n), dtype=np.float32)
        mask = np.zeros((b, n), dtype=bool)
        history = np.zeros((b, self.history_len), dtype=np.int64)
        profile = np.zeros((b, len(self.profile_fields)), dtype=np.int64)
        oov: list[int] = []
        index, unknown = self.item_index, self.oov_index
        for row, job in enumerate(jobs):
            m = len(job.item_ids)
            ids = [index.get(i, unknown) for i in job.item_ids]
            items[row, :m] = ids
            scores[row, :m] = job.scores
            mask[row, :m] = True
            oov.append(ids.count(unknown))
            past = [index.get(i, unknown) for i in job.features.history[-self.history_len :]]
            if past:
                history[row, -len(past) :] = past
            for col, (name, vocab) in enumerate(zip(self.profile_fields, self.profile_index, strict=True)):
                profile[row, col] = vocab.get(job.features.profile.get(name, ""), 0)
        return {"items": items, "scores": scores, "mask": mask, "history": history, "profile": profile}, oov

    def infer(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """(B, L) logits for one padded feed."""
        logits: np.ndarray = self.session.run(["logits"], feed)[0]
        return logits

    def rank(self, jobs: list[Job]) -> list[Ranked]:
        """Top-k of every job, best first; ties keep the request order. Each carries when this call began and how
        long its encoding and inference took (the top-k after it is microseconds a list)."""
        started = time.monotonic()
        feed, oov = self.encode(jobs)
        logits = self.infer(feed)
        run_s = time.monotonic() - started
        out = []
        for row, job in enumerate(jobs):
            scores = logits[row, : len(job.item_ids)]
            order = np.argsort(-scores, kind="stable")[: job.k]
            out.append(Ranked(order, scores[order], oov[row], self.version, started, run_s))
        return out


def find_version(root: Path, version: str = "") -> Path:
    """The folder to serve: ``root`` itself if it holds a manifest, ``root/version``, or the newest
    manifest (by its created_at) under ``root``."""
    if (root / "manifest.json").is_file() and not version:
        return root
    if version:
        # One folder name under root: "../x" or "/abs" would let the admin endpoint load from anywhere.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", version):
            raise ModelError(f"{version!r} is not a version folder name (letters, digits, '.', '_', '-')")
        folder = root / version
        if not (folder / "manifest.json").is_file():
            raise ModelError(f"{folder}: no such model version (no manifest.json)")
        return folder
    candidates = []
    for manifest in root.glob("*/manifest.json"):
        try:
            candidates.append((json.loads(manifest.read_text()).get("created_at", ""), manifest.parent))
        except (OSError, ValueError):
            continue
    if not candidates:
        raise ModelError(f"{root}: no model version found (run `make model` or `python -m training pipeline`)")
    return max(candidates)[1]
