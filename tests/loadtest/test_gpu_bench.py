"""`make bench-gpu` (loadtest/gpu.py): its ranking arithmetic, and the harness run end to end on the CPU provider
(CI has no GPU; the CUDA rows of reports/gpu.md come from the same code on a GPU host)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from loadtest import gpu

ROOT = Path(__file__).resolve().parents[2]


def test_top_keeps_request_order_on_ties_and_ignores_padding() -> None:
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 9.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    first, second = gpu.top(logits, [4, 5], k=3)
    assert first.tolist() == [1, 2, 0]  # position 4 is padding for a 4-candidate list
    assert second.tolist() == [0, 1, 2]


def test_ndcg_is_the_offline_n6_one_for_the_ideal_order_and_zero_for_a_list_without_positives() -> None:
    labels = [[0, 1, 0, 1], [0, 0, 0]]
    ideal = np.array([[0.0, 2.0, 1.0, 3.0], [3.0, 2.0, 1.0, -np.inf]], dtype=np.float32)  # second list: 3 long
    assert gpu.ndcg(ideal, labels, [4, 3], k=2) == pytest.approx(0.5)  # (1 + 0) / 2, as training.metrics has it
    worst = np.array([[3.0, 0.0, 2.0, 1.0], [3.0, 2.0, 1.0, -np.inf]], dtype=np.float32)
    assert gpu.ndcg(worst, labels, [4, 3], k=2) == pytest.approx(0.0)
    assert gpu.ndcg(ideal[:1], labels[:1], [4], k=2) == pytest.approx(1.0)


def test_agreement_counts_order_set_and_overlap() -> None:
    ref = np.tile(np.arange(10, 0, -1, dtype=np.float32), (3, 1))  # top 6 = positions 0..5 in order
    other = ref.copy()
    other[1, [0, 1]] = other[1, [1, 0]]  # same set, order swapped
    other[2, 5], other[2, 6] = 0.0, 20.0  # position 6 replaces position 5 and comes first
    a = gpu.agreement(ref, other, [10, 10, 10])
    assert a["same_top6_order"] == pytest.approx(1 / 3, abs=1e-4)
    assert a["same_top6_set"] == pytest.approx(2 / 3, abs=1e-4)
    assert a["mean_top6_overlap"] == pytest.approx((1 + 1 + 5 / 6) / 3, abs=1e-4)
    assert a["max_abs_logit_diff"] == pytest.approx(16.0) and a["non_finite_logits"] == 0


def test_the_harness_on_the_cpu_provider_ranks_like_the_export(model_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "loadtest.gpu", "--models", str(model_root), "--out", str(out),
                          "--providers", "cpu", "--skip-service", "--batch-sizes", "1,4", "--model-min-s", "0.01"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((out / "gpu.json").read_text())
    quality = result["model"]["quality"]
    # The CPU session is the exported graph the export's own top-6 came from.
    assert quality["cpu fp32"]["same_top6_as_export"] == 1.0
    half = quality["cpu fp16"]["vs cpu fp32"]
    assert half["non_finite_logits"] == 0 and half["mean_top6_overlap"] > 0.9
    assert [row["batch"] for row in result["model"]["timing"]] == [1, 4]
    assert all(row["cpu fp32"]["p50_ms"] > 0 for row in result["model"]["timing"])
    report = (out / "gpu.md").read_text()
    assert "## Agreement over the" in report and "| cpu fp16 |" in report


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has a CUDA provider: the refusal is for builds without one")
def test_asking_for_cuda_without_a_cuda_provider_exits_2(model_root: Path, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "loadtest.gpu", "--models", str(model_root), "--out",
                          str(tmp_path), "--providers", "cuda", "--skip-service"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA provider" in run.stderr
    assert not (tmp_path / "gpu.json").exists()
