# The two entry points of the README: `make demo` and `make test`. Both build .venv first when it is missing or
# older than pyproject.toml / this file. VARIANT=gpu installs the CUDA stack instead (README, "GPU machines").
#
# CPU (the default): the shim in packaging/fbgemm-gpu-cpu-shim is an empty `fbgemm-gpu` 1.8.0+cpu that depends on
# fbgemm-gpu-cpu==1.8.0; given on the same command line as '.[cpu,...]' it meets torchrec's `fbgemm-gpu`
# requirement with the CPU build, so torchrec installs with its own dependencies, the CUDA fbgemm-gpu wheel (2.7 GB)
# is never fetched, and `pip check` passes (checked below).
PY         ?= python3.11
VENV       ?= .venv
VARIANT    ?= cpu
EXTRAS     ?= dev
TORCH_INDEX ?=
CUDA_INDEX ?= https://download.pytorch.org/whl/cu128
SHIM       := packaging/fbgemm-gpu-cpu-shim
ifeq ($(VARIANT),gpu)
  TORCH_FIRST := pip install --index-url $(CUDA_INDEX) torch==2.13.0 fbgemm-gpu==1.8.0
  BUILD       := gpu
  SHIM_ARG    :=
else
  # TORCH_INDEX=https://download.pytorch.org/whl/cpu: the CPU-only torch build (PyPI's Linux torch is the CUDA one)
  TORCH_FIRST := $(if $(TORCH_INDEX),pip install --index-url $(TORCH_INDEX) torch==2.13.0,true)
  BUILD       := cpu
  SHIM_ARG    := ./$(SHIM)
endif
INSTALL = pip install $(SHIM_ARG) -e '.[$(BUILD),$(EXTRAS)]'
BIN := $(VENV)/bin

.PHONY: setup demo check test bench clean redis-server
setup: $(VENV)/.installed redis-server

# the serving tests start their own redis-server (Debian package); installed only when missing, and only as root
redis-server:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -qq redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }; } \
	  || echo "redis-server is missing: install it (apt-get install -y redis-server) for tests/test_serving.py"; }

$(VENV)/.installed: pyproject.toml Makefile $(SHIM)/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(filter true,$(TORCH_FIRST)),,$(BIN)/$(TORCH_FIRST) --quiet)
	$(BIN)/$(INSTALL) --quiet
	$(BIN)/pip check
	$(BIN)/python -c "import fbgemm_gpu, torchrec, torchrec_sid; print('torchrec-sid', torchrec_sid.__version__)"
	touch $@

demo: setup
	$(BIN)/torchrec-sid demo

check: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/$(INSTALL:]'=,bench]') --quiet
	PYTHON=$(BIN)/python bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV)
