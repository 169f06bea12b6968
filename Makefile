# prime-rs: set-up, build, test and demo in one place.
#
#   make demo    build, then run the embedded default job (configs/demo.toml): warm-up + PRIME
#   make rehearsal  the paper's run at its real shapes on a CPU (configs/rehearsal.toml)
#   make test    build and run every test (Rust + reference checks against transformers)
#   make lint    rustfmt and clippy (also of the NCCL feature, which builds without CUDA), and
#                cargo-deny: licenses and duplicate crates (deny.toml; advisories need the
#                RustSec git database, which offline builds cannot fetch)
#   make build   release build; leaves target/release/prime (libtorch found through its rpath)
#
# Everything the build needs is installed here on first use: a Python venv with the PyPI
# torch==2.13.0 wheel (tch 0.26 links against exactly that libtorch), transformers,
# safetensors and numpy for the reference tests. The venv lives in $(PRIME_CACHE), outside
# the repo, and is reused by later runs and clones. protoc is vendored by the proto crate.

SHELL := /bin/bash
PRIME_CACHE ?= $(HOME)/.cache/prime-rs
VENV := $(PRIME_CACHE)/venv
PYTHON_REQS := tests/python/requirements.txt
VENV_STAMP := $(VENV)/.prime-$(shell cat $(PYTHON_REQS) 2>/dev/null | cksum | cut -d' ' -f1)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CONFIG ?= configs/demo.toml
RUN_DIR ?= runs/demo

# torch-sys asks this venv's python where libtorch is and which C++ ABI it uses.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
export PRIME_VENV := $(VENV)
# The machine is small and shared: keep torch from oversubscribing it.
export PRIME_THREADS ?= 2

# Debian packages: bubblewrap (the code grader's sandbox). The plot font is compiled in.
DEB_PACKAGES := bubblewrap

.PHONY: all deps venv build demo rehearsal test test-deploy lint fmt clean

all: build

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq $$missing; \
	fi

venv: $(VENV_STAMP)

$(VENV_STAMP): $(PYTHON_REQS)
	@command -v python3 >/dev/null || { echo "python3 (>= 3.10, with venv) is required"; exit 1; }
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || { echo "python3 >= 3.10 is required"; exit 1; }
	@python3 -m venv --help >/dev/null 2>&1 || { echo "installing python3-venv"; apt-get install -y python3-venv; }
	@mkdir -p $(PRIME_CACHE)
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --progress-bar off -r $(PYTHON_REQS)
	@rm -f $(VENV)/.prime-* && touch $@

build: deps venv
	cargo build --release -j $(JOBS) -p prime-cli
	@echo "built target/release/prime"

# Warm-up (when its checkpoint is missing), then PRIME with a verifier, a learner and two
# actors on loopback; one torch thread per process on a 2-core machine.
demo: build
	PRIME_THREADS=$${PRIME_THREADS:-1} target/release/prime train --config $(CONFIG) --run-dir $(RUN_DIR)

# The paper's run rehearsed on a CPU (configs/rehearsal.toml; docs/running-the-paper.md): a
# full-size stand-in for Eurus-2-RL-Data (482K rows), a model with Qwen2.5-Math-7B's vocabulary
# and context, the paper's lengths and algorithm, a verifier, a learner and two actors, 3 steps.
rehearsal: build
	target/release/prime world --standin --out runs/rehearsal/standin
	test -f runs/rehearsal/model/config.json || target/release/prime model init \
		--config configs/rehearsal.toml --tokenizer runs/rehearsal/standin/tokenizer \
		--out runs/rehearsal/model
	PRIME_THREADS=$${PRIME_THREADS:-1} target/release/prime train --config configs/rehearsal.toml \
		--run-dir runs/rehearsal/run

test: deps venv
	cargo build -j $(JOBS) --workspace --all-targets
	$(MAKE) --no-print-directory test-deploy
	cargo test -j $(JOBS) --workspace -- --test-threads 2

# The Helm chart rendered by Helm's Go engine (PyPI helm-python-sdk), linted, validated against
# the Kubernetes API schemas (kubernetes-validate) and checked for meaning; deploy/Dockerfile
# parsed and held to `make build`. Its flag check runs target/debug/prime --help when built.
test-deploy: venv
	$(VENV)/bin/python -m unittest discover -s tests/deploy -v

# The NCCL backend builds without CUDA (libnccl is loaded at run time): checked here so CI
# compiles it on CPU machines.
lint: venv
	cargo fmt --all -- --check
	cargo clippy -j $(JOBS) --workspace --all-targets -- -D warnings
	cargo clippy -j $(JOBS) -p prime-cli -p prime-collective --all-targets --features prime-cli/nccl,prime-collective/nccl -- -D warnings
	# licenses and duplicate crates (deny.toml); advisories need the RustSec git database
	cargo deny --offline check licenses bans

fmt:
	cargo fmt --all

clean:
	cargo clean
