"""The fault suite's fast scenarios, in CI: hostile input, a short Redis kill/restart, a Sentinel failover, a short
reload series and slow senders.

Each runs the real `python -m service` process and a real redis-server, with load from a second process;
``make faults`` runs all seven at full length and writes reports/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import faults, faults_report


@pytest.mark.slow
@pytest.mark.parametrize("name", faults.QUICK)
def test_quick_fault_scenario_passes_every_check(name: str, model_root: Path) -> None:
    (result,) = faults.run([name], model_root, quick=True)
    failed = [check for check, ok in result["checks"].items() if not ok]
    assert not failed, (failed, {k: v for k, v in result.items() if k != "hostile_statuses"})
    assert result["requests"] > 0 or name == "hostile"


def test_report_lists_every_scenario_with_its_figures(tmp_path: Path) -> None:
    results = [{"scenario": "redis_kill", "requests": 10, "failed": 0, "rejected": 0, "fallbacks": 0,
                "p99_before_ms": 1.0, "p99_during_ms": 2.0, "p99_after_ms": 1.5,
                "checks": {"no failed request": True, "breaker opened": False}, "passed": False, "seconds": 3.0}]
    text = faults_report.write_report(results, tmp_path, "python -m loadtest.faults", 3.0).read_text()
    assert "| redis_kill | 10 | 0 | 0 | 0 | 1.0 | 2.0 | 1.5 | 1/2 |" in text
    assert "- FAIL: breaker opened" in text and "- PASS: no failed request" in text


def test_hostile_bodies_cover_the_issue_list() -> None:
    names = " ".join(name for name, _, _ in faults.hostile_bodies(50))
    for word in ("oversized", "nested", "huge number", "non-UTF-8", "thousands of candidates"):
        assert word in names


def test_rss_growth_ignores_one_sample_and_sees_a_leak() -> None:
    level = [280.0, 300.0, 285.0, 290.0, 282.0, 301.0, 284.0, 286.0, 283.0, 288.0, 305.0]  # the last sample jumps
    assert faults.rss_growth(level) < faults.RSS_LEVEL_MB
    leak = [280.0 + 4.0 * i for i in range(11)]  # 4 MiB a reload
    assert faults.rss_growth(leak) > faults.RSS_LEVEL_MB
