"""Tiny end to end: train -> export -> ONNX Runtime parity, the manifest contract, refusal on mismatch."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service import manifest as manifest_module
from tests.training.fixtures import Tiny
from training import export, metrics
from training.train import TrainConfig, build_model, lr_factor, predict, resolve_device, train


def test_training_improves_on_its_initialisation(tiny: Tiny) -> None:
    epochs = tiny.result.epochs
    assert epochs[0]["loss"] > epochs[-1]["loss"]
    assert tiny.result.best_valid["N@6"] == max(e["valid_N@6"] for e in epochs)
    # The kept model is the best epoch's: re-evaluating it reproduces that validation N@6.
    valid = tiny.lists["valid"]
    again = metrics.evaluate(predict(tiny.result.model, valid), valid.labels, valid.mask)
    assert again["N@6"] == pytest.approx(tiny.result.best_valid["N@6"])


def test_same_seed_same_model(tiny: Tiny) -> None:
    cfg = dataclasses.replace(tiny.cfg, epochs=1)
    a = train(tiny.dataset, tiny.lists, cfg, progress=False)
    b = train(tiny.dataset, tiny.lists, cfg, progress=False)
    c = train(tiny.dataset, tiny.lists, dataclasses.replace(cfg, seed=1), progress=False)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.state_dict().values(),
                                                         c.model.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def exported(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    return export.export(tiny.result.model, tiny.dataset, tiny.lists, out, "tiny-v1",
                         {"reranker": dataclasses.asdict(tiny.cfg)}, {"test": {"N@6": 1.0}})


def test_export_writes_a_checked_contract(exported: Path, tiny: Tiny) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["format"] == manifest_module.FORMAT and manifest["version"] == "tiny-v1"
    assert {f.name for f in exported.iterdir()} == {"manifest.json", *manifest["files"]}
    for name, meta in manifest["files"].items():
        assert manifest_module.sha256(exported / name) == meta["sha256"], name
    assert [i["name"] for i in manifest["graph"]["inputs"]] == ["items", "scores", "mask", "history", "profile"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["topk_identical"] >= 0.99
    assert json.loads((exported / "items.json").read_text()) == tiny.dataset.item_ids
    assert [f["name"] for f in manifest["profile_fields"]] == [f.name for f in tiny.dataset.user_fields]
    assert not list(exported.parent.glob(".*.tmp")), "the temporary folder must be gone"


def test_weights_reload_the_same_model_without_pickle(exported: Path, tiny: Tiny) -> None:
    again = export.load_reranker(exported)
    test = tiny.lists["test"]
    np.testing.assert_array_equal(predict(again, test), predict(tiny.result.model, test))
    np.load(exported / "weights.npz", allow_pickle=False).close()  # would raise on a pickled object


def test_snapshot_and_heldout_match_the_data(exported: Path, tiny: Tiny) -> None:
    d = tiny.dataset
    rows = [json.loads(line) for line in (exported / "user_features.jsonl").read_text().splitlines()]
    assert [r["user_id"] for r in rows] == d.user_ids
    test = d.splits["test"]
    u, start = int(test.user[0]), int(test.start[0])
    assert rows[u]["history"] == [d.item_id(i) for i in d.seq_items[u][max(0, start - d.history_len) : start]]
    heldout = [json.loads(line) for line in (exported / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == len(test)
    first = heldout[0]
    assert len(first["request"]["candidates"]) == 30 and len(first["offline_topk"]) == metrics.K
    assert set(first["offline_topk"]) <= {c["item_id"] for c in first["request"]["candidates"]}


def test_onnx_serves_any_batch_and_shorter_lists(exported: Path, tiny: Tiny) -> None:
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    test = tiny.lists["test"]
    model = tiny.result.model.eval()
    for rows, n in ((slice(0, 1), 30), (slice(0, 7), 11)):
        feed = export.onnx_feed(test, rows)
        feed = {k: (v[:, :n] if k in {"items", "scores", "mask"} else v) for k, v in feed.items()}
        got = session.run(["logits"], feed)[0]
        with torch.no_grad():
            want = model(*(torch.from_numpy(feed[name]) for name, _, _ in export.INPUTS)).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    # A shuffled list gives the same scores per item: positions are derived in the graph.
    feed = export.onnx_feed(test, slice(0, 4))
    perm = np.random.default_rng(0).permutation(30)
    shuffled = {k: (v[:, perm] if k in {"items", "scores", "mask"} else v) for k, v in feed.items()}
    assert np.allclose(session.run(["logits"], feed)[0][:, perm], session.run(["logits"], shuffled)[0], atol=1e-4)


def test_export_refuses_on_parity_mismatch(tiny: Tiny, tmp_path: Path) -> None:
    with pytest.raises(export.ParityError, match="torch vs ONNX Runtime"):
        export.export(tiny.result.model, tiny.dataset, tiny.lists, tmp_path, "bad", {}, {}, max_abs_diff=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite(exported: Path, tiny: Tiny) -> None:
    with pytest.raises(FileExistsError, match="tiny-v1 exists"):
        export.export(tiny.result.model, tiny.dataset, tiny.lists, exported.parent, "tiny-v1", {}, {})


@pytest.mark.parametrize("overrides", [{"variant": "prm-residual", "schedule": "cosine"}, {"variant": "prm-late"},
                                       {"variant": "prm-late", "positions": False, "history": False,
                                        "side_features": False}], ids=["residual", "late", "late-ablated"])
def test_new_pathways_and_ablations_train_and_export_with_parity(tiny: Tiny, tmp_path: Path,
                                                                 overrides: dict[str, object]) -> None:
    cfg = dataclasses.replace(tiny.cfg, epochs=2, **overrides)
    result = train(tiny.dataset, tiny.lists, cfg, progress=False)
    path = export.export(result.model, tiny.dataset, tiny.lists, tmp_path, "v", {}, {})  # refuses without parity
    manifest = json.loads((path / "manifest.json").read_text())
    # An ablated model still takes every input of the contract, so the service needs no special case.
    assert [i["name"] for i in manifest["graph"]["inputs"]] == ["items", "scores", "mask", "history", "profile"]
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["items", "scores", "mask", "history", "profile"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-4


def test_cosine_schedule_warms_up_then_decays_to_lr_min() -> None:
    cfg = TrainConfig(schedule="cosine", epochs=4, warmup=0.5, lr_min=0.1)
    factor = lr_factor(cfg, steps_per_epoch=10)
    steps = [factor(s) for s in range(40)]
    assert steps[0] == pytest.approx(0.2) and steps[4] == pytest.approx(1.0)  # 5 warm-up steps
    assert all(a >= b for a, b in itertools.pairwise(steps[4:]))  # then never rises
    assert factor(40) == pytest.approx(0.1) and steps[-1] > 0.1
    # The constant schedule warms up for one epoch too, then holds.
    constant = [lr_factor(TrainConfig(), 10)(s) for s in range(40)]
    assert constant[0] == pytest.approx(0.1) and set(constant[9:]) == {1.0}
    assert {lr_factor(TrainConfig(warmup=0), 10)(s) for s in range(40)} == {1.0}
    with pytest.raises(ValueError, match="schedule 'step'"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match=r"score_dropout 1.0 is not in \[0, 1\)"):
        TrainConfig(score_dropout=1.0)
    with pytest.raises(ValueError, match=r"dropout -0.1 is not in \[0, 1\)"):
        TrainConfig(dropout=-0.1)


def test_a_residual_model_that_learns_nothing_stays_the_retriever_order(tiny: Tiny) -> None:
    cfg = dataclasses.replace(tiny.cfg, variant="prm-residual", epochs=2, patience=5, lr=0.0)
    result = train(tiny.dataset, tiny.lists, cfg, progress=False)
    valid = tiny.lists["valid"]
    assert result.best_epoch == 0  # the untrained model competed, and nothing beat it
    retriever = metrics.evaluate(valid.scores, valid.labels, valid.mask)["N@6"]
    assert result.best_valid["N@6"] == pytest.approx(retriever)


@pytest.mark.parametrize("switch", ["positions", "history", "side_features"])
def test_ablation_variants_turn_off_one_input_each(tiny: Tiny, switch: str) -> None:
    variant = f"prm-no-{switch.replace('_', '-')}"
    model = build_model(tiny.dataset, dataclasses.replace(tiny.cfg, variant=variant), 30)
    flags = {name: getattr(model.cfg, name) for name in ("positions", "history", "side_features")}
    assert flags == {name: name != switch for name in flags} and model.cfg.pathway == "none"


def test_device_cpu_trains_and_exports_with_parity_and_cuda_without_a_gpu_is_refused(tiny: Tiny,
                                                                                       tmp_path: Path) -> None:
    cfg = dataclasses.replace(tiny.cfg, variant="prm-late", epochs=1, device="cpu")
    result = train(tiny.dataset, tiny.lists, cfg, progress=False)
    assert result.device == "cpu" and next(result.model.parameters()).device.type == "cpu"
    path = export.export(result.model, tiny.dataset, tiny.lists, tmp_path, "cpu", {}, {})  # refuses without parity
    assert json.loads((path / "manifest.json").read_text())["parity"]["topk_identical"] == 1.0
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train(tiny.dataset, tiny.lists, dataclasses.replace(cfg, device="cuda"), progress=False)
    with pytest.raises(ValueError, match="device 'tpu'"):
        TrainConfig(device="tpu")

