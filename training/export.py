"""Export a trained reranker to ``models/<version>/``: ONNX graph + manifest (its contract) + features.

Owns: the ONNX export, the torch vs ONNX Runtime parity gate, the manifest, the user-feature snapshot
and the held-out requests file. Does not know: how the model was trained, or how the service serves it.

Files written (all listed with their sha256 in ``manifest.json``):
    model.onnx           the graph; inputs/outputs as in the manifest, any batch size, lists up to max
    items.json           raw item ids; index = position + first_index (0 pad, 1 OOV)
    user_features.jsonl  per user: raw profile values and the last history_len raw item ids, oldest first
    heldout.jsonl        the test lists as /rerank requests with labels and the offline top-k
    weights.npz          the torch state_dict as plain arrays (``load_reranker``; no pickle), for offline use
The directory is written under a temporary name and renamed, so a half-written model never exists.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from service.manifest import Graph, Items, Manifest, ModelError, ProfileField, Tensor
from service.model import RerankModel
from training import metrics
from training.candidates import CandidateLists
from training.data import ITEM_OFFSET, OOV, PAD, Dataset
from training.model import ModelConfig, Reranker
from training.train import predict

FEATURES_SCHEMA = 1
OPSET = 17
INPUTS = [  # name, dtype, shape; "batch", "candidates", "history" are dynamic
    ("items", "int64", ["batch", "candidates"]),
    ("scores", "float32", ["batch", "candidates"]),
    ("mask", "bool", ["batch", "candidates"]),
    ("history", "int64", ["batch", "history"]),
    ("profile", "int64", ["batch", "fields"]),
]
OUTPUTS = [("logits", "float32", ["batch", "candidates"])]


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with torch beyond tolerance; nothing was written."""


@dataclass
class Parity:
    lists: int
    max_abs_diff: float
    topk_identical: float  # share of lists whose top-k (order included) is identical


def export_onnx(model: Reranker, path: Path, sample: CandidateLists) -> None:
    """Legacy TorchScript exporter (``dynamo=False``): fast, no onnxscript at export time, and every op
    used here maps to a plain ONNX op. Positions are derived from the scores inside the graph, and the
    item table (id + side features) is baked in as one constant."""
    model = copy.deepcopy(model).freeze()
    n = min(len(sample), 4)
    args = (torch.from_numpy(sample.items[:n]), torch.from_numpy(sample.scores[:n]),
            torch.from_numpy(sample.mask[:n]), torch.from_numpy(sample.history[:n]),
            torch.from_numpy(sample.profile[:n]))
    axes = {name: {i: dim for i, dim in enumerate(shape) if dim != "fields"} for name, _, shape in INPUTS + OUTPUTS}
    torch.onnx.export(model, args, str(path), input_names=[n for n, _, _ in INPUTS],
                      output_names=[n for n, _, _ in OUTPUTS], dynamic_axes=axes, opset_version=OPSET,
                      dynamo=False)


def onnx_feed(lists: CandidateLists, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
    sub = lists.subset(rows)
    return {"items": sub.items, "scores": sub.scores, "mask": sub.mask, "history": sub.history,
            "profile": sub.profile}


def check_parity(model: Reranker, onnx_path: Path, lists: CandidateLists, k: int = metrics.K,
                 batch_size: int = 512) -> Parity:
    """Run torch (positions derived from scores, as in the graph) and ONNX Runtime on ``lists``."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model.eval()
    max_diff, identical = 0.0, 0
    for start in range(0, len(lists), batch_size):
        feed = onnx_feed(lists, slice(start, start + batch_size))
        with torch.no_grad():
            expected = model(*(torch.from_numpy(feed[name]) for name, _, _ in INPUTS)).numpy()
        got = session.run(["logits"], feed)[0]
        m = feed["mask"]
        max_diff = max(max_diff, float(np.abs(got - expected)[m].max(initial=0.0)))
        identical += int((metrics.topk_indices(got, k, m) == metrics.topk_indices(expected, k, m)).all(1).sum())
    return Parity(len(lists), max_diff, identical / max(len(lists), 1))


def load_reranker(folder: Path) -> Reranker:
    """The torch model of an exported version, from ``manifest.json`` and ``weights.npz`` (no pickle), in
    eval mode. For offline use (fine-tuning, the naive baseline in ``loadtest/servers.py``); the service
    serves ``model.onnx``."""
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / manifest["weights"]["file"], allow_pickle=False) as npz:
        state = {k: torch.from_numpy(npz[k]) for k in npz.files}
    cfg = ModelConfig(**manifest["model_config"])
    tokens = [state[f"item_field_{i}"] for i in range(len(cfg.item_field_sizes))]
    model = Reranker(cfg, tokens)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _request(dataset: Dataset, lists: CandidateLists, row: int, topk: np.ndarray) -> dict[str, Any]:
    item_id = dataset.item_id
    m = lists.mask[row]
    return {
        "request": {
            "request_id": f"heldout-{row}",
            "user_id": dataset.user_ids[lists.user[row]],
            "candidates": [{"item_id": item_id(i), "score": round(float(s), 6)}
                           for i, s in zip(lists.items[row][m], lists.scores[row][m], strict=True)],
            "k": len(topk),
        },
        "labels": [int(z) for z in lists.labels[row][m]],
        "offline_topk": [item_id(lists.items[row][j]) for j in topk],
    }


def user_snapshot(dataset: Dataset, lists: dict[str, CandidateLists]) -> list[dict[str, Any]]:
    """Each user's features as the service sees them at serving time: the history of the user's latest list (the
    test list, where the user has one; lists of each split are in time order, splits train, valid, test)."""
    latest: dict[int, np.ndarray] = {}
    for split in ("train", "valid", "test"):
        if split in lists:
            latest |= {int(u): h for u, h in zip(lists[split].user, lists[split].history, strict=True)}
    rows = []
    for u, user_id in enumerate(dataset.user_ids):
        past = latest.get(u, np.zeros(0, dtype=np.int64))
        profile = {f.name: (f.vocab[f.tokens[u, 0] - 1] if f.tokens[u, 0] > 0 else "") for f in dataset.user_fields}
        history = [dataset.item_id(i) for i in past if i >= ITEM_OFFSET]
        rows.append({"user_id": user_id, "profile": profile, "history": history})
    return rows


def write_files(model: Reranker, dataset: Dataset, lists: dict[str, CandidateLists], folder: Path) -> None:
    """The version's data files beside the graph: weights, item ids, the user-feature snapshot, and the held-out
    requests with the offline top-k (the service's parity and replay input)."""
    np.savez(folder / "weights.npz", **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    (folder / "items.json").write_text(json.dumps(dataset.item_ids))
    with open(folder / "user_features.jsonl", "w") as f:
        for user in user_snapshot(dataset, lists):
            f.write(json.dumps(user) + "\n")
    test = lists["test"]
    offline = metrics.topk_indices(predict(model, test), metrics.K, test.mask)
    with open(folder / "heldout.jsonl", "w") as f:
        for row in range(len(test)):
            f.write(json.dumps(_request(dataset, test, row, offline[row])) + "\n")


def manifest(model: Reranker, dataset: Dataset, test: CandidateLists, version: str, config: dict[str, Any],
             offline_metrics: dict[str, Any], parity: Parity) -> Manifest:
    """The version's manifest: the graph's contract, the vocabularies, and the records of how it was made."""
    cfg = model.cfg
    return Manifest(
        version=version,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        graph=Graph("model.onnx", OPSET, [Tensor(n, d, list(s)) for n, d, s in INPUTS],
                    [Tensor(n, d, list(s)) for n, d, s in OUTPUTS]),
        max_candidates=cfg.max_candidates,
        history_len=cfg.history_len,
        score_range=(0.0, 1.0),
        items=Items("items.json", len(dataset.item_ids), PAD, OOV, ITEM_OFFSET),
        profile_fields=[ProfileField(f.name, list(f.vocab)) for f in dataset.user_fields],
        records={
            "dataset": dataset.name,
            "user_features": {"file": "user_features.jsonl", "schema": FEATURES_SCHEMA,
                              "count": len(dataset.user_ids)},
            "heldout": {"file": "heldout.jsonl", "count": len(test), "k": metrics.K},
            "model_config": dataclasses.asdict(cfg),
            "weights": {"file": "weights.npz", "format": "torch state_dict as numpy arrays; load_reranker()"},
            "config": json.loads(json.dumps(config, default=str)),
            "metrics": offline_metrics,
            "parity": dataclasses.asdict(parity),
        },
    )


def export(model: Reranker, dataset: Dataset, lists: dict[str, CandidateLists], out_root: Path, version: str,
           config: dict[str, Any], offline_metrics: dict[str, Any], max_abs_diff: float = 1e-4,
           min_topk_identical: float = 0.99, overwrite: bool = False) -> Path:
    """Export, check parity on the test lists, and write ``out_root/version`` atomically.

    Raises ``ParityError`` (and writes nothing) when the max absolute logit difference exceeds
    ``max_abs_diff``, fewer than ``min_topk_identical`` of the lists get an identical top-k, or the
    service's loader refuses the result.
    """
    final = out_root / version
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; choose another --version or pass --overwrite")
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        test = lists["test"]
        export_onnx(model, tmp / "model.onnx", test)
        parity = check_parity(model, tmp / "model.onnx", test)
        if parity.max_abs_diff > max_abs_diff or parity.topk_identical < min_topk_identical:
            raise ParityError(f"torch vs ONNX Runtime: max |diff| {parity.max_abs_diff:.3g} "
                              f"(limit {max_abs_diff:.3g}), identical top-{metrics.K} "
                              f"{parity.topk_identical:.4f} (limit {min_topk_identical})")

        write_files(model, dataset, lists, tmp)
        manifest(model, dataset, test, version, config, offline_metrics, parity).write(tmp)
        try:  # the service's own loader is the judge of the contract
            RerankModel(tmp, providers="cpu")
        except ModelError as exc:
            raise ParityError(f"the service would refuse this export: {exc}") from None
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

