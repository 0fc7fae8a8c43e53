"""Quality against serving cost: a variant at each model capacity, in fp32 and as an int8 export, side by side.

    python -m training capacity --variant prm --capacities 64x1,128x2 --seeds 2   # reports/ml100k_capacity.md

Owns: exporting each trained capacity to ONNX, its int8 copy (ONNX Runtime's dynamic quantisation of the weights),
and the measures a serving choice needs: test N@6 computed from the graph's own logits, ONNX Runtime CPU cost per
list at batch 1 and 64 (one intra-op thread, median over repeats), the int8 graph's top-6 agreement with the fp32
graph of the same model, and the file size. Does not know: how runs train or are cached (``runner.py``), the main
report (``report.py``).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from training import metrics
from training.candidates import CandidateLists
from training.export import check_parity, export_onnx, onnx_feed
from training.model import Reranker


def parse_capacities(text: str) -> list[tuple[int, int]]:
    """"64x1,128x2" -> [(64, 1), (128, 2)] (hidden size x candidate-transformer layers)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        hidden, _, layers = part.partition("x")
        if not (hidden.isdigit() and layers.isdigit()) or int(hidden) < 1 or int(layers) < 1:
            raise ValueError(f"capacity {part!r} is not HIDDENxLAYERS (e.g. 64x1)")
        out.append((int(hidden), int(layers)))
    if not out:
        raise ValueError("no capacity to measure (--capacities)")
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_logits(sess: ort.InferenceSession, lists: CandidateLists, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], onnx_feed(lists, slice(s, s + batch_size)))[0]
                           for s in range(0, len(lists), batch_size)])


def microseconds_per_list(sess: ort.InferenceSession, lists: CandidateLists, batch: int, repeats: int = 7,
                          calls: int = 30) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` runs at ``batch`` lists, per list, in µs."""
    n = max(1, min(calls, len(lists) // batch))
    feeds = [onnx_feed(lists, slice(i * batch, (i + 1) * batch)) for i in range(n)]
    for feed in feeds[:3]:
        sess.run(["logits"], feed)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            sess.run(["logits"], feeds[i % len(feeds)])
        times.append((time.perf_counter() - t0) / calls / batch * 1e6)
    return statistics.median(times)


def quantise(fp32: Path, int8: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)


@dataclass
class Measured:
    capacity: str
    precision: str
    seed: int
    test_n6: float
    valid_n6: float
    us_batch1: float
    us_batch64: float
    same_top6_order: float  # share of test lists with the fp32 graph's top 6 in the same order (1 for fp32)
    same_top6_set: float
    size_kb: float


def measure(model: Reranker, capacity: str, seed: int, lists: dict[str, CandidateLists]) -> list[Measured]:
    """Both precisions of one trained model, measured on the test lists (N@6, agreement, cost)."""
    test, valid = lists["test"], lists["valid"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, fp32, test)
        parity = check_parity(model, fp32, test)
        if parity.topk_identical < 0.99:
            raise RuntimeError(f"{capacity} seed {seed}: fp32 graph's top 6 matches torch on only "
                               f"{parity.topk_identical:.1%} of the test lists")
        quantise(fp32, int8)
        reference = graph_logits(session(fp32), test)
        top_ref = metrics.topk_indices(reference, mask=test.mask)
        for precision, path in (("fp32", fp32), ("int8", int8)):
            sess = session(path)
            logits = graph_logits(sess, test)
            top = metrics.topk_indices(logits, mask=test.mask)
            out.append(Measured(
                capacity, precision, seed,
                test_n6=metrics.evaluate(logits, test.labels, test.mask)["N@6"],
                valid_n6=metrics.evaluate(graph_logits(sess, valid), valid.labels, valid.mask)["N@6"],
                us_batch1=microseconds_per_list(sess, test, 1),
                us_batch64=microseconds_per_list(sess, test, 64),
                same_top6_order=float((top == top_ref).all(1).mean()),
                same_top6_set=float(np.mean([set(a) == set(b) for a, b in zip(top, top_ref, strict=True)])),
                size_kb=path.stat().st_size / 1024))
    return out


def write(out_dir: Path, name: str, variant: str, rows: list[Measured], command: str, info: dict[str, Any]
          ) -> Path:
    """``<name>_capacity.md`` and ``.json``: mean over seeds per capacity and precision."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}_capacity.json").write_text(json.dumps(
        {"variant": variant, "command": command, **info, "rows": [r.__dict__ for r in rows]}, indent=1))
    keys = list(dict.fromkeys((r.capacity, r.precision) for r in rows))
    lines = [f"# {name}: {variant} at each capacity, fp32 and int8", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand. Test N@6 is computed "
             "from each ONNX graph's own logits on the test lists of the default sampler; cost is ONNX Runtime on "
             f"this machine's CPU ({info.get('cpu', '?')}), one intra-op thread, median of 7 repeats of 30 calls, per "
             "list; int8 is `onnxruntime.quantization.quantize_dynamic` (weights int8, activations quantised at run "
             "time); agreement is the int8 graph's top 6 against the fp32 graph of the same model. Mean over seeds "
             "(seeds in brackets).", "",
             "| capacity (hidden x layers) | precision | test N@6 | valid N@6 | µs / list, batch 1 | "
             "µs / list, batch 64 | same top 6, same order | same top-6 set | graph size (KiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for capacity, precision in keys:
        part = [r for r in rows if r.capacity == capacity and r.precision == precision]

        def mean(field: str, part: list[Measured] = part) -> float:
            return float(np.mean([getattr(r, field) for r in part]))

        lines.append(f"| {capacity} | {precision} | {mean('test_n6'):.2f} ({len(part)}) | {mean('valid_n6'):.2f} | "
                     f"{mean('us_batch1'):.0f} | {mean('us_batch64'):.0f} | {100 * mean('same_top6_order'):.1f}% | "
                     f"{100 * mean('same_top6_set'):.1f}% | {mean('size_kb'):.0f} |")
    path = out_dir / f"{name}_capacity.md"
    path.write_text("\n".join(lines) + "\n")
    return path
