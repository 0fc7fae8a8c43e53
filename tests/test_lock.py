"""pylock.toml pins every dependency of the service, each wheel with a sha256, and agrees with pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def test_lock_pins_every_service_dependency_with_hashes() -> None:
    lock = tomllib.loads((ROOT / "pylock.toml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    packages = {canonicalize_name(p["name"]): p for p in lock["packages"]}
    env = default_environment()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        locked = packages.get(canonicalize_name(req.name))
        assert locked is not None, f"{req.name} is not in pylock.toml: run `make lock`"
        assert req.specifier.contains(locked["version"], prereleases=True), f"{req.name} {locked['version']} vs {req}"
    for name, p in packages.items():
        if "directory" in p:  # the project itself
            continue
        assert p["wheels"] and all(w["hashes"]["sha256"] for w in p["wheels"]), name
    assert not {"torch", "onnxruntime-gpu", "recbole"} & set(packages), "the service lock must stay small"


def test_lock_is_public_and_leaves_the_project_out() -> None:
    """Every wheel from the public index (a lock resolved through a local mirror carries file:// URLs that exist on
    one machine), no directory entry (pip cannot hash one, so `pip install -r pylock.toml` refused it), and the
    onnxruntime version the GPU image installs as onnxruntime-gpu (deploy/lock-constraints.txt)."""
    text = (ROOT / "pylock.toml").read_text()
    lock = tomllib.loads(text)
    assert "file://" not in text
    for p in lock["packages"]:
        assert "directory" not in p and canonicalize_name(p["name"]) != "dnr-rerank", p["name"]
        for wheel in p["wheels"]:
            assert wheel["url"].startswith("https://files.pythonhosted.org/"), wheel["url"]
    pins = dict(line.split("==") for line in (ROOT / "deploy" / "lock-constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    versions = {canonicalize_name(p["name"]): p["version"] for p in lock["packages"]}
    assert versions["onnxruntime"] == pins["onnxruntime"]
