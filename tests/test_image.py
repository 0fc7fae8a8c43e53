"""The image builds, proven without a Docker daemon (`make image-check`): the Dockerfile's build context and
install step replayed in a fresh virtualenv with pip's local configuration off (so every wheel comes from the
public index, as in a real build), then the service started from that virtualenv serves a model.

Needs the public package index (PyPI), like `docker build` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name

from loadtest.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 600
READY_TIMEOUT_S = 60


def runtime_stage(dockerfile: str) -> str:
    """The Dockerfile's ``runtime`` stage: from its FROM line to the next FROM."""
    match = re.search(r"^FROM \S+ AS runtime\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S)
    assert match, "the Dockerfile has no runtime stage"
    return match.group(1)


def replay_context(stage: str, context: Path) -> None:
    """Copy what the stage's COPY lines copy (sources relative to the repo, destination relative to WORKDIR)."""
    for line in re.findall(r"^COPY (.+)$", stage, re.M):
        *sources, dest = line.split()
        assert not any(s.startswith("--") for s in sources), f"unexpected COPY flags: {line}"
        for source in sources:
            src = ROOT / source
            target = context / dest / src.name if dest.endswith("/") else context / dest
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)


def public_pip_env(venv: Path) -> dict[str, str]:
    """The environment of a build machine: no PIP_* variables, no pip config files, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "VIRTUAL_ENV"}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding what the image's install step installs, from the public index."""
    tmp_path = tmp_path_factory.mktemp("image")
    stage = runtime_stage((ROOT / "Dockerfile").read_text())
    install = re.search(r"^RUN sh install\.sh \"\$RUNTIME\"", stage, re.M)
    assert install, "the runtime stage no longer installs through deploy/install.sh: update this replay"
    context, venv = tmp_path / "app", tmp_path / "venv"
    context.mkdir()
    replay_context(stage, context)
    assert (context / "install.sh").read_bytes() == (ROOT / "deploy" / "install.sh").read_bytes()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(["sh", "install.sh", "cpu"], cwd=context, env=public_pip_env(venv), capture_output=True,
                          text=True, timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, f"install.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return venv


@pytest.mark.slow
def test_image_install_replayed_from_the_public_index_serves_a_model(image_venv: Path, model_root: Path,
                                                                     tmp_path: Path) -> None:
    venv, env = image_venv, public_pip_env(image_venv)
    # What landed: the lock's versions (onnxruntime the one the GPU image gets too), the project, and no torch.
    python = str(venv / "bin" / "python")
    lock = {canonicalize_name(p["name"]): p["version"]
            for p in tomllib.loads((ROOT / "pylock.toml").read_text())["packages"]}
    probe = ("import importlib.metadata as m, importlib.util as u, json; "
             "print(json.dumps({'versions': {d.metadata['Name'].lower(): d.version for d in m.distributions()}, "
             "'torch': u.find_spec('torch') is not None}))")
    found = json.loads(subprocess.run([python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      check=True).stdout)
    assert found["torch"] is False
    installed = {canonicalize_name(name): version for name, version in found["versions"].items()}
    for name, version in lock.items():
        assert installed.get(name) == version, (name, version, installed.get(name))
    assert installed["dnr-rerank"] and "dnr-rerank" not in lock

    # The service from that virtualenv, outside the checkout (so `service` is the installed package).
    port = free_port()
    server_env = env | {"RERANK_MODEL_DIR": str(model_root), "RERANK_MODEL_VERSION": "tiny-v1",
                        "RERANK_PORT": str(port), "RERANK_DRAIN_DELAY_S": "0", "RERANK_REDIS_URL": ""}
    log = (tmp_path / "service.log").open("w")
    server = subprocess.Popen([python, "-m", "service"], cwd=tmp_path, env=server_env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert server.poll() is None, (tmp_path / "service.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready in time:\n" + (tmp_path / "service.log").read_text()
            time.sleep(0.2)
        row = json.loads((model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()[0])
        r = httpx.post(f"{base}/rerank", json=row["request"] | {"timeout_ms": 5000}, timeout=10)
        assert r.status_code == 200, r.text
        assert [i["item_id"] for i in r.json()["items"]] == row["offline_topk"]
        assert "rerank_requests_total" in httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        log.close()
    # uvicorn re-raises the signal once it has shut down gracefully, so a drained exit reads as -SIGTERM.
    text = (tmp_path / "service.log").read_text()
    assert code in (0, -signal.SIGTERM) and "drained and stopped" in text, (code, text)


# The service's own tests, in the image's environment plus the test tools: no torch, no pandas, no training
# package on the path, the models trained by this session (RERANK_TEST_MODELS).
SERVICE_TESTS = [f"tests/service/test_{name}.py" for name in ("admission", "app", "batcher", "config", "features",
                                                                "model")]
TEST_TOOLS = ["pytest", "pytest-asyncio", "httpx"]


@pytest.mark.slow
def test_the_service_tests_pass_without_torch(image_venv: Path, model_root: Path, tmp_path: Path) -> None:
    env = public_pip_env(image_venv)
    python = str(image_venv / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", *TEST_TOOLS], env=env, capture_output=True,
                          text=True, timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    # The checkout's service/ and tests/ (cwd), the image's packages; training/ is hidden from the path.
    sandbox = tmp_path / "checkout"
    for name in ("service", "tests", "loadtest"):
        shutil.copytree(ROOT / name, sandbox / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".env.example", "README.md"):
        shutil.copy2(ROOT / name, sandbox / name)
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SERVICE_TESTS], cwd=sandbox,
                         env=env | {"RERANK_TEST_MODELS": str(model_root)}, capture_output=True, text=True,
                         timeout=INSTALL_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout) and "skipped" not in run.stdout, run.stdout[-2000:]
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch'), "
                            "u.find_spec('training'))"], cwd=sandbox, env=env, capture_output=True, text=True)
    assert probe.stdout.split() == ["None", "None"], probe.stdout
