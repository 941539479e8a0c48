# Each target creates .venv if it is missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha1sum | cut -c1-12)

.PHONY: demo test test-pure build bench lint clean venv pyverbs-link rdma-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,bench]'
	@$(MAKE) -s pyverbs-link
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# The install compiles the hot path (mesh/_build.py's modules, Cython, gcc) unless
# MESH_PURE_PYTHON=1. After editing one of them, `make build` compiles it again
# (until then the edited .py runs, with a warning: never the stale build).
build: $(STAMP)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c 'import mesh; print("zmesh build:", mesh._build.describe())'

demo: $(STAMP)
	$(BIN)/mesh demo

# The tests also cover mesh.torch and the DDP example: torch==2.13.0 (the torch
# extra, CPU) for the test venv only; the demo does not need it.
TORCH_STAMP := $(VENV)/.torch-2.13.0
$(TORCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench,torch]'
	@touch $(TORCH_STAMP)

test: $(STAMP) $(TORCH_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The fast core tests again on the pure-Python build (the .py of every compiled
# module, in the same venv: MESH_PURE_PYTHON=1 at import, see mesh/_build.py).
PURE_TESTS := tests/test_build.py tests/test_flow.py tests/test_routing.py tests/test_subjects.py \
	tests/test_batching.py tests/test_node_local.py tests/test_hostile.py tests/test_flow_procs.py \
	tests/test_zcore.py
test-pure: $(STAMP)
	MESH_PURE_PYTHON=1 $(BIN)/python -m pytest -q $(PURE_TESTS)

# The references (nats-server from Debian, the bench extra's Zenoh and nats-py,
# torch for Gloo from the local wheel) are installed by bench/setup.sh, only for
# benchmarks.
bench: $(STAMP)
	bash bench/setup.sh $(BIN)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
	find mesh -name '*.so' -delete

# pyverbs (the RDMA transport) comes from Debian's python3-pyverbs, not PyPI:
# link just that package into the venv when it is installed.
PYVERBS_DEB := /usr/lib/python3/dist-packages/pyverbs
PYVERBS_PTH = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zmesh-pyverbs.pth
pyverbs-link: $(BIN)/python
	@if [ -d $(PYVERBS_DEB) ]; then \
	  mkdir -p $(VENV)/pyverbs-link && ln -sfn $(PYVERBS_DEB) $(VENV)/pyverbs-link/pyverbs && \
	  echo "$(abspath $(VENV))/pyverbs-link" > "$(PYVERBS_PTH)" && \
	  if $(BIN)/python -c 'import pyverbs.device' 2>/dev/null; then echo "pyverbs: linked into $(VENV)"; \
	  else rm -f "$(PYVERBS_PTH)"; echo "pyverbs: Debian's build does not import in $(BIN)/python"; fi; \
	else echo "pyverbs: not installed (apt-get install python3-pyverbs): rdma transport off"; fi

# The RDMA tests on two real soft-RoCE devices, in the project's QEMU guest
# tests/harness/rdma_vm/run (root; ~2-5 min, the first run ~1 min more).
# `run --prepare` installs what the guest needs (python3-pyverbs among it) before
# pyverbs-link links pyverbs into the venv: the venv may predate it. The pure
# RDMA core (tests/test_rdma_core.py) runs in `make test`: not again at ~20x here.
RDMA_VM_RUN := tests/harness/rdma_vm/run
rdma-test: $(STAMP)
	$(RDMA_VM_RUN) --prepare
	@$(MAKE) -s pyverbs-link
	$(RDMA_VM_RUN) --timeout 900 -- $(BIN)/python -m pytest -q tests/test_rdma_vm.py tests/test_rdma_node.py
