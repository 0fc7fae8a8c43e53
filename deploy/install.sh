#!/bin/sh
# The image's install steps: the Dockerfile runs this file, and `make image-check` replays it in a fresh
# virtualenv with pip's local configuration off, so the two cannot drift.
#
#   sh install.sh cpu|gpu      (in a folder holding pyproject.toml, README.md, pylock.toml and service/)
#
# cpu: exactly the wheels in pylock.toml, each checked against its sha256, then the project itself without
#      dependencies (a directory has no hash, so it stays out of the lock).
# gpu: Python 3.12 (the CUDA image's), where the lock's cp311 wheels do not install: the lock's versions as
#      constraints, then onnxruntime swapped for onnxruntime-gpu at the same version as the lock's onnxruntime.
set -eu
runtime="${1:-cpu}"
pip install --no-cache-dir "pip==26.3"
if [ "$runtime" = gpu ]; then
    python - >/tmp/constraints.txt <<'PY'
import tomllib
for p in tomllib.load(open("pylock.toml", "rb"))["packages"]:
    print(f"{p['name']}=={p['version']}")
PY
    ort="$(sed -n 's/^onnxruntime==//p' /tmp/constraints.txt)"
    pip install --no-cache-dir -c /tmp/constraints.txt .
    pip uninstall -y onnxruntime
    pip install --no-cache-dir "onnxruntime-gpu==${ort}"
elif [ "$runtime" = cpu ]; then
    pip install --no-cache-dir -r pylock.toml
    pip install --no-cache-dir --no-deps .
else
    echo "install.sh: runtime must be cpu or gpu, not '$runtime'" >&2
    exit 2
fi
