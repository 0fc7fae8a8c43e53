# Targets people type. `make test` is the README's test command and what CI runs; `make serve` runs the service.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The variant `make model` builds when models/ is empty: the one the committed pipeline report ships
# (reports/ml100k_info.json, shipped_variant: the best on validation, a DNR variant only when it is ahead of the
# best baseline beyond the seeds' noise), so the default model follows the evidence; prm if there is none.
DEFAULT_VARIANT ?= $(shell python3 -c "import json; print(json.load(open('reports/ml100k_info.json'))['shipped_variant'])" 2>/dev/null || echo prm)
# Training runs at once in `make pipeline` and `make dnr-choices`, one torch thread each.
JOBS ?= $(shell nproc)

.PHONY: test lint typecheck validate promtool pytest redis wrk serve model pipeline capacity dnr-choices bench bench-gpu loadtest lock image-check faults log-roundtrip log-replay scale ddp snapshot-memory clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	# MovieLens-100K ships inside this wheel; --no-deps keeps recbole's own torch and friends out.
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	touch $(STAMP)

# Integration tests start their own redis-server on a free loopback port; install it when missing.
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi; }

lint: $(STAMP)
	$(PY) -m ruff check training service tests loadtest deploy

typecheck: $(STAMP)
	$(PY) -m mypy --strict service
	$(PY) -m mypy training

pytest: $(STAMP) redis
	$(PY) -m pytest -q

# Deployment files, without a Docker daemon: Dockerfile lint, compose schema (CPU and GPU variants), Kubernetes
# schemas (strict), the Prometheus config and alert rules (promtool check) and the alerts' unit tests.
validate: $(STAMP) promtool
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/docker-compose -f deploy/docker-compose.yml config --quiet
	$(VENV)/bin/docker-compose -f deploy/docker-compose.yml -f deploy/docker-compose.gpu.yml config --quiet
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml
	promtool check config deploy/prometheus/prometheus.yml
	promtool test rules deploy/prometheus/alerts.test.yml

# promtool comes with Debian's prometheus package (installed, not started).
promtool:
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (apt-get install prometheus)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null; fi; }

test: lint typecheck validate pytest

# A servable model in a few minutes: one seed of DEFAULT_VARIANT on ML-100K, default lists, no regimes table.
model: $(STAMP)
	$(PY) -m training pipeline --variants $(DEFAULT_VARIANT) --seeds 1 --regime-samplers "" --no-paper-protocol \
	  --controlled-aucs "" --out-reports build/reports --version ml100k-$(DEFAULT_VARIANT)-default

# Runs the service on 127.0.0.1:8000 (RERANK_* settings, see .env.example), building a model first if
# models/ has none. Uses Redis when RERANK_REDIS_URL is set.
serve: $(STAMP)
	@ls models/*/manifest.json >/dev/null 2>&1 || $(MAKE) model
	$(PY) -m service

# The offline pipeline on ML-100K: the leakage audit of every sampler; PRM, prm-late, the matched heuristic and the
# faithful DNR variants x 5 seeds under the default sampler; then the regime variants (retriever, prm, the best
# score pathway and the best DNR variant on validation) on the paper's own protocol (INVALID by the audit) x 2 seeds,
# on the semi-synthetic controlled-informativeness regimes x 3 seeds, and under the other samplers x 2 seeds:
# reports/ml100k.md with its CSVs and plots, and the best variant on validation in models/. Runs train JOBS at a
# time with one torch thread each, one progress bar over all runs with an ETA; each finished run is kept in
# build/runs, so an interrupted pipeline resumes where it stopped (delete build/runs to train everything again).
# TRAIN_DEVICE=auto trains on a GPU when torch sees one (the report names the device).
PIPELINE_VARIANTS ?= retriever,prm,prm-late,m,dnr-g,dnr-b,dnr-m,dnr-b-eq7
TRAIN_DEVICE ?= auto
pipeline: $(STAMP)
	$(PY) -m training pipeline --jobs $(JOBS) --threads 1 --device $(TRAIN_DEVICE) --variants $(PIPELINE_VARIANTS) \
	  --seeds 5 --regime-seeds 2 --controlled-seeds 3

# Quality against serving cost for the shipped variant: hidden 64 x 1 layer (the default) and 128 x 2 (the paper's
# size), 2 seeds each, each exported in fp32 and int8: reports/ml100k_capacity.md. Reuses the pipeline's runs.
capacity: $(STAMP)
	$(PY) -m training capacity --variant $(DEFAULT_VARIANT) --capacities 64x1,128x2 --seeds 2 --jobs $(JOBS) --threads 1

# The knobs the paper leaves open, one at a time, for dnr-g on validation, 3 seeds each with PRM on the same
# seeds beside them: reports/ml100k_choices.md (~60 min on 2 cores).
dnr-choices: $(STAMP)
	$(PY) -m training choices --variant dnr-g --seeds 3 --jobs $(JOBS) --threads 1

# The load generator of `make bench` (a Debian package, C); installed like redis-server.
wrk:
	@command -v wrk >/dev/null || { \
	  echo "installing wrk (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq wrk >/dev/null; fi; }

# The service with 1 and N workers vs the HTTP ceiling with as many processes vs the model alone, wrk closed
# loop and fixed-rate open loop, 3 interleaved repeats: reports/benchmark.{md,json,png} (~7 min).
bench: $(STAMP) redis wrk
	@ls models/*/weights.npz >/dev/null 2>&1 || $(MAKE) model
	$(PY) -m loadtest.bench

# The GPU figures: the model alone on CUDA fp32/fp16 and CPU at batch 1..1024, fp16/fp32 top-6 agreement, GPU
# memory per worker, the service on CUDA and CPU at 1/2/4/8 workers: reports/gpu.{md,json} (~3 min on an H200).
# Run it with a Python whose environment has onnxruntime-gpu (and onnx, for the fp16 graph):
#   make bench-gpu GPU_PY=/opt/gpu-venv/bin/python
# It exits 2, measuring nothing, where ONNX Runtime has no CUDA provider.
GPU_PY ?= $(PY)
bench-gpu: wrk
	@ls models/*/weights.npz >/dev/null 2>&1 || $(MAKE) model
	$(GPU_PY) -m loadtest.gpu

# Locust against a running service (make serve): SCENARIO=steady|ramp|spike, USERS, DURATION_S; CSV + HTML in build/locust/.
SCENARIO ?= steady
USERS ?= 20
DURATION_S ?= 60
HOST ?= http://127.0.0.1:8000
loadtest: $(STAMP)
	@mkdir -p build/locust
	LOCUST_SCENARIO=$(SCENARIO) LOCUST_USERS=$(USERS) LOCUST_DURATION_S=$(DURATION_S) \
	  $(VENV)/bin/locust -f loadtest/locustfile.py --headless --host $(HOST) \
	  --csv build/locust/$(SCENARIO) --html build/locust/$(SCENARIO).html --only-summary

# The service's dependencies, pinned with hashes (PEP 751): what the CPU image installs. Rerun after editing
# the base dependencies in pyproject.toml; tests/test_lock.py checks that the two agree.
# pylock.toml from the public index (pip's local configuration off), the project itself left out: deploy/lock.sh.
lock: $(STAMP)
	PY=$(PY) bash deploy/lock.sh

# The image's install step (deploy/install.sh) replayed from the public index in a fresh virtualenv, then the
# service started from it (also part of `make test`, as tests/test_image.py).
image-check: $(STAMP)
	$(PY) -m pytest -q tests/test_image.py

# The fault suite: real service + Redis on loopback, each fault under load: reports/reliability.{md,json} (< 10 min).
faults: $(STAMP) redis
	@ls models/*/heldout.jsonl >/dev/null 2>&1 || $(MAKE) model
	$(PY) -m loadtest.faults

# The candidate-log path against the built-in one on ML-100K's lists (arrays, audit, PRM N@6 at seed 0):
# reports/log_roundtrip.md (~5 min).
log-roundtrip: $(STAMP)
	$(PY) -m training log-roundtrip

# The held-out requests through the service with its request log on, joined with their labels and read back by
# the pipeline's reader: reports/log_replay.md.
log-replay: $(STAMP)
	@ls models/*/heldout.jsonl >/dev/null 2>&1 || $(MAKE) model
	$(PY) -m loadtest.log_replay

# Wall time and peak RSS per pipeline stage on the synthetic log at 1x, 10x, 100x ML-100K: reports/scale.{md,png}.
scale: $(STAMP)
	$(PY) -m training scale --factors 1,10,100

# One training process against torchrun over 2, 3 seeds each: reports/ddp.md.
ddp: $(STAMP)
	$(PY) -m training ddp --procs 2 --seeds 0,1,2

# Memory per service worker with 0, 10k and 100k users in the snapshot: reports/snapshot_memory.md.
snapshot-memory: $(STAMP)
	@ls models/*/heldout.jsonl >/dev/null 2>&1 || $(MAKE) model
	$(PY) -m loadtest.snapshot_memory

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
