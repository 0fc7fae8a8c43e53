"""Settings: environment parsing, refusals, and .env.example staying in step with the fields."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, default_workers, refusals, usable_cores
from service.workers import worker_settings

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_documents_every_setting() -> None:
    documented = {line.split("=")[0] for line in (ROOT / ".env.example").read_text().splitlines()
                  if line.startswith("RERANK_")}
    assert documented == {f"RERANK_{name.upper()}" for name in Settings.model_fields}


def test_env_example_loads_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s == Settings(_env_file=None)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("RERANK_REDIS_URL", "rediss://:secret@cache:6380/1")
    s = Settings(_env_file=None)
    assert s.max_batch_size == 8 and s.redis_url.startswith("rediss://")


@pytest.mark.parametrize(("name", "value", "message"), [
    ("RERANK_MAX_BATCH_SIZE", "0", "max_batch_size"),
    ("RERANK_PROVIDERS", "tpu", "providers"),
    ("RERANK_DEFAULT_TIMEOUT_MS", "20000", "default_timeout_ms 20000.0 exceeds max_timeout_ms"),
    ("RERANK_PORT", "http", "port"),
])
def test_nonsense_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                message: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None)


def test_a_refusal_names_the_variable_and_value_but_never_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_PORT", "http")
    monkeypatch.setenv("RERANK_REDIS_URL", "redis+sentinel://:hunter2@h:1?sentinel_password=hunter3")
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)
    lines = refusals(refused.value)
    assert len(lines) == 2 and "hunter" not in " ".join(lines)
    assert any(line.startswith("RERANK_PORT='http': ") for line in lines)
    assert any(line.startswith("RERANK_REDIS_URL: ") and "names no master" in line for line in lines)


def test_the_service_refuses_bad_settings_in_one_line_each_and_exits_2() -> None:
    env = {**os.environ, "RERANK_REDIS_URL": "http://:hunter2@h:1", "RERANK_WORKERS": "-1"}
    done = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "hunter" not in done.stderr
    assert "RERANK_REDIS_URL: " in done.stderr and "RERANK_WORKERS='-1': " in done.stderr, done.stderr


def test_the_batcher_never_waits_by_default() -> None:
    # Measured on CPU and on an H200 (reports/gpu.md): a 2 ms wait on GPU cost 2.5 ms at one connection.
    assert Settings(_env_file=None).max_wait_ms == 0.0
    assert Settings(_env_file=None, max_wait_ms=5).max_wait_ms == 5.0


def test_workers_default_to_the_usable_cores_capped_by_a_cgroup_cpu_limit(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert usable_cores(cpu_max) == 8  # no cgroup file
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == 8
    cpu_max.write_text("150000 100000\n")  # a 1.5-core limit: two workers, the second one partly used
    assert usable_cores(cpu_max) == 2
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1
    monkeypatch.setattr("service.config.usable_cores", lambda: 4)
    settings = Settings(_env_file=None)
    assert settings.resolved_workers() == 4 and Settings(_env_file=None, workers=3).resolved_workers() == 3
    # On one GPU: half the cores, at most 8; a setting still wins.
    assert Settings(_env_file=None, providers="cuda").resolved_workers() == 2
    assert Settings(_env_file=None, providers="cuda", workers=3).resolved_workers() == 3
    monkeypatch.setattr("service.config.usable_cores", lambda: 32)
    assert default_workers("cuda") == 8 and default_workers("auto") == 32 and default_workers("cpu") == 32
    monkeypatch.setattr("service.config.usable_cores", lambda: 1)
    assert default_workers("cuda") == 1
    monkeypatch.setattr("service.config.usable_cores", lambda: 4)
    # ONNX Runtime threads: its own default with one worker, else the cores split among the workers.
    assert settings.resolved_intra_op_threads(1) == 0
    assert settings.resolved_intra_op_threads(2) == 2 and settings.resolved_intra_op_threads(8) == 1
    assert Settings(_env_file=None, intra_op_threads=3).resolved_intra_op_threads(2) == 3


def test_a_worker_gets_its_share_of_the_in_flight_limit_and_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.config.usable_cores", lambda: 4)
    base = Settings(_env_file=None, max_in_flight=64, model_version="v1")
    one = worker_settings(base, 3, "")
    assert (one.max_in_flight, one.intra_op_threads, one.model_version) == (22, 1, "v1")  # ceil(64 / 3)
    restarted = worker_settings(base, 2, "v2")  # a replacement loads the version every worker reloaded to
    assert (restarted.max_in_flight, restarted.intra_op_threads, restarted.model_version) == (32, 2, "v2")
    assert worker_settings(Settings(_env_file=None, max_in_flight=1), 4, "").max_in_flight == 1


def test_admission_settings_hold_their_ranges() -> None:
    assert Settings(_env_file=None).admission == "deadline"
    for bad in ({"admission": "adaptive"}, {"admission_door": "kernel"}, {"body_timeout_ms": 0},
                {"admission_deadline_share": 0}, {"admission_deadline_share": 1.5}, {"admission_window_s": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            Settings(_env_file=None, **bad)
