"""Shared fixtures. The service's (Redis, exported models, the app under uvicorn) import no torch, so the
service's tests run in a service-only environment: there ``RERANK_TEST_MODELS`` names a folder holding the
exported versions tiny-v1 and tiny-v2 (tests/test_image.py runs them that way). With the training extra
installed, the models are trained and exported here (tests/training/fixtures.py)."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.procs import RedisServer, free_port

HAVE_TRAINING = importlib.util.find_spec("torch") is not None
if HAVE_TRAINING:  # the fixtures must be in this module's namespace for pytest to find them
    from tests.training.fixtures import ml100k, synthetic_files, tiny  # noqa: F401


# ---------------------------------------------------------------------------------------------- service


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


MODELS_ENV = "RERANK_TEST_MODELS"


@pytest.fixture(scope="session")
def model_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two exported versions of the tiny model (same weights): v1 and v2, for reload tests. Trained here, or
    the folder ``RERANK_TEST_MODELS`` names (a service-only environment)."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    if not HAVE_TRAINING:
        raise RuntimeError(f"no torch to train the test models: install the train extra or set {MODELS_ENV}")
    from training import export

    tiny = request.getfixturevalue("tiny")
    root = tmp_path_factory.mktemp("served-models")
    for version in ("tiny-v1", "tiny-v2"):
        export.export(tiny.result.model, tiny.dataset, tiny.lists, root, version, {}, {"test": {}})
    return root


def slow_model(svc: ServiceThread, seconds: float) -> None:
    """Every batch of the served model takes ``seconds`` longer (the worker thread sleeps first)."""
    from service.app import runtime_of, service_of

    model = runtime_of(service_of(svc.app)).model
    original = model.rank

    def slow(jobs: Any) -> Any:
        time.sleep(seconds)
        return original(jobs)

    model.rank = slow


class ServiceThread:
    """The real app under uvicorn on a free port, in a background thread."""

    def __init__(self, settings: Any, tracing: Any = None) -> None:
        import uvicorn

        from service.app import create_stack
        from service.server import uvicorn_config

        self.port = settings.port
        stack = create_stack(settings, tracing=tracing)
        self.app = stack.app
        self.server = uvicorn.Server(uvicorn_config(stack, settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("service did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def service_settings(model_dir: Path, **overrides: Any) -> Any:
    from service.config import Settings

    values: dict[str, Any] = {"model_dir": model_dir, "model_version": "tiny-v1", "port": free_port(),
                              "admin_token": "test-token", "redis_url": "", "log_level": "warning"}
    values.update(overrides)
    return Settings(_env_file=None, **values)
