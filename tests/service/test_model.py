"""service/model.py and service/manifest.py on their own (no torch): the manifest contract both sides share,
encoding a batch, top-k and its ties, and picking a version folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.manifest import FORMAT, Manifest, ModelError
from service.model import COLD_START, Job, RerankModel, UserFeatures, find_version


@pytest.fixture(scope="module")
def model(model_root: Path) -> RerankModel:
    return RerankModel(model_root / "tiny-v1", providers="cpu", intra_op_threads=1)


def copy(model_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-v1"
    shutil.copytree(model_root / "tiny-v1", folder)
    return folder


def test_the_manifest_reads_back_to_the_json_the_export_wrote(model_root: Path) -> None:
    raw = json.loads((model_root / "tiny-v1" / "manifest.json").read_text())
    manifest = Manifest.read(model_root / "tiny-v1")
    assert manifest.to_json() == raw  # typed fields and the export's free-form records, nothing lost
    assert manifest.format == FORMAT and manifest.version == "tiny-v1"
    assert [t.name for t in manifest.graph.inputs] == ["items", "scores", "mask", "history", "profile"]
    assert set(manifest.files) == {p.name for p in (model_root / "tiny-v1").iterdir()} - {"manifest.json"}


def test_write_checksums_the_folder_and_read_accepts_it(model_root: Path, tmp_path: Path) -> None:
    folder = copy(model_root, tmp_path)
    manifest = Manifest.read(folder)
    (folder / "notes.txt").write_text("a file added after the export")
    written = Manifest(**{**vars(manifest), "files": {}}).write(folder)
    assert "notes.txt" in written.files and Manifest.read(folder) == written


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m | {"format": "other/v9"}, "format 'other/v9', this service reads"),
    (lambda m: {k: v for k, v in m.items() if k != "items"}, "missing key 'items'"),
    (lambda m: m | {"max_candidates": "many"}, "malformed field (ValueError"),
    (lambda m: m | {"score_range": [0.0]}, "malformed field (ValueError"),
    (lambda m: m | {"files": m["files"] | {"model.onnx": {"sha256": "0" * 64}}}, "sha256 does not match"),
    (lambda m: m | {"files": m["files"] | {"gone.bin": {"sha256": "0"}}}, "gone.bin: listed in the manifest but"),
    (lambda m: m | {"files": {k: v for k, v in m["files"].items() if k != "items.json"}},
     "items.json has no checksum"),
], ids=["format", "missing key", "bad int", "bad range", "checksum", "missing file", "unchecked items"])
def test_a_manifest_that_breaks_the_contract_is_refused_naming_why(model_root: Path, tmp_path: Path, change: object,
                                                                   message: str) -> None:
    folder = copy(model_root, tmp_path)
    path = folder / "manifest.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))  # type: ignore[operator]
    with pytest.raises(ModelError, match=message.replace("(", r"\(")):
        Manifest.read(folder)


def test_encode_pads_counts_unknown_items_and_keeps_the_newest_history(model: RerankModel) -> None:
    known = list(model.item_index)
    field = model.profile_fields[0]
    value = next(iter(model.profile_index[0]))
    history = tuple(known[: model.history_len + 3])
    jobs = [Job([known[0], "no-such-item", known[1]], np.array([0.9, 0.5, 0.1], np.float32),
                UserFeatures({field: value}, history), 2),
            Job([known[2]], np.array([0.3], np.float32), COLD_START, 1)]
    feed, oov = model.encode(jobs)
    assert oov == [1, 0]
    assert feed["items"].tolist() == [[model.item_index[known[0]], model.oov_index, model.item_index[known[1]]],
                                      [model.item_index[known[2]], 0, 0]]
    assert feed["mask"].tolist() == [[True, True, True], [True, False, False]]
    assert feed["scores"][1].tolist() == [pytest.approx(0.3), 0.0, 0.0]
    newest = [model.item_index[i] for i in history[-model.history_len:]]
    assert feed["history"][0].tolist() == newest and not feed["history"][1].any()  # cold start: all padding
    assert feed["profile"][0, 0] == model.profile_index[0][value] and feed["profile"][1, 0] == 0


def test_rank_takes_the_top_k_by_logit_and_ties_keep_the_request_order(model: RerankModel,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    known = list(model.item_index)[:4]
    job = Job(known, np.full(4, 0.5, np.float32), COLD_START, 3)
    monkeypatch.setattr(model, "infer", lambda feed: np.array([[1.0, 3.0, 1.0, 3.0]], np.float32))
    (ranked,) = model.rank([job])
    assert ranked.positions.tolist() == [1, 3, 0] and ranked.logits.tolist() == [3.0, 3.0, 1.0]
    assert ranked.version == "tiny-v1" and ranked.oov_items == 0


def test_the_session_runs_on_cpu_and_any_batch_size(model: RerankModel) -> None:
    assert model.providers == ["CPUExecutionProvider"] and not model.on_gpu
    known = list(model.item_index)
    jobs = [Job(known[:n], np.linspace(1, 0, n, dtype=np.float32), COLD_START, 1) for n in (1, 5, 30)]
    assert [len(r.positions) for r in model.rank(jobs)] == [1, 1, 1]
    assert model.warm_up((1, 2)) > 0


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_an_explicit_cuda_that_cannot_run_is_refused_and_auto_falls_back(model_root: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():  # onnxruntime-gpu: CUDA may really run here
        pytest.skip("this onnxruntime has a CUDA provider; on a GPU host cuda must run, tested by make bench-gpu")
    folder = find_version(model_root)
    with pytest.raises(ModelError, match=r"RERANK_PROVIDERS=cuda but ONNX Runtime runs \['CPUExecutionProvider'\]"):
        RerankModel(folder, providers="cuda")
    assert RerankModel(folder, providers="auto").providers == ["CPUExecutionProvider"]
    # A build that offers CUDA but cannot load it (onnxruntime-gpu 1.31 on CUDA 12): the session falls back to
    # CPU, and an explicit cuda is still refused.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelError, match="is onnxruntime-gpu installed"):
        RerankModel(folder, providers="cuda")


def test_find_version_picks_a_folder_by_name_or_the_newest(model_root: Path, tmp_path: Path) -> None:
    assert find_version(model_root, "tiny-v2") == model_root / "tiny-v2"
    assert find_version(model_root / "tiny-v1") == model_root / "tiny-v1"  # a version folder itself
    root = tmp_path / "models"
    for name, created in (("old", "2026-01-01T00:00:00Z"), ("new", "2026-06-01T00:00:00Z")):
        shutil.copytree(model_root / "tiny-v1", root / name)
        path = root / name / "manifest.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"created_at": created}))
    assert find_version(root) == root / "new"
    with pytest.raises(ModelError, match="not a version folder name"):
        find_version(root, "../old")
    with pytest.raises(ModelError, match="no such model version"):
        find_version(root, "missing")
