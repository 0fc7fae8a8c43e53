#!/usr/bin/env bash
# Writes pylock.toml: the service's dependencies (pyproject.toml) resolved against the public index only.
# pip's local configuration (config files and PIP_* variables; on our machines a local mirror) is switched
# off, or the lock would carry file:// URLs that exist on one machine. The project itself is not locked:
# deploy/install.sh installs it without dependencies after the hashed lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >"$reqs"
unset $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p')
PIP_CONFIG_FILE=/dev/null "$PY" -m pip lock -r "$reqs" -c deploy/lock-constraints.txt -o pylock.toml --quiet
if grep -q 'file://' pylock.toml; then
    echo "lock.sh: pylock.toml holds file:// URLs" >&2
    exit 1
fi
