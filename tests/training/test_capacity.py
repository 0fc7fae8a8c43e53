"""Quality against serving cost: each capacity exported in fp32 and int8 and measured from the graphs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.training.fixtures import Tiny
from training import capacity, metrics
from training.train import predict, train


def test_capacities_parse_and_bad_ones_are_refused() -> None:
    assert capacity.parse_capacities("64x1, 128x2") == [(64, 1), (128, 2)]
    for bad in ("64", "64x0", "x2", ""):
        with pytest.raises(ValueError):
            capacity.parse_capacities(bad)


def test_fp32_and_int8_graphs_are_measured_side_by_side(tiny: Tiny, tmp_path: Path) -> None:
    result = train(tiny.dataset, tiny.lists, dataclasses.replace(tiny.cfg, variant="prm-late", epochs=1),
                   progress=False)
    rows = capacity.measure(result.model, "32x1", 0, tiny.lists)
    fp32, int8 = rows
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    # The fp32 graph agrees with itself; int8 agrees on most lists and is a smaller file.
    assert fp32.same_top6_order == 1.0 and 0.0 < int8.same_top6_set <= 1.0
    assert int8.size_kb < fp32.size_kb
    # N@6 is read from the graph's own logits: the fp32 graph scores the test lists as the torch model does.
    test = tiny.lists["test"]
    torch_n6 = metrics.evaluate(predict(result.model, test), test.labels, test.mask)["N@6"]
    assert fp32.test_n6 == pytest.approx(torch_n6, abs=0.01)
    assert all(r.us_batch1 > 0 and r.us_batch64 > 0 for r in rows)
    path = capacity.write(tmp_path, "tiny", "prm-late", rows, "python -m training capacity", {"cpu": "test"})
    text = path.read_text()
    assert "| 32x1 | fp32 |" in text and "| 32x1 | int8 |" in text
    assert json.loads((tmp_path / "tiny_capacity.json").read_text())["rows"][1]["precision"] == "int8"
