# The two entry points of the README: `make demo` and `make test`. Both build .venv first when it is missing or
# older than pyproject.toml. VARIANT=gpu installs the CUDA stack instead (see README, "GPU machines").
PY        ?= python3.11
VENV      ?= .venv
VARIANT   ?= cpu
TORCH     := torch==2.13.0
TORCHREC  := torchrec==1.8.0
CUDA_INDEX ?= https://download.pytorch.org/whl/cu128
ifeq ($(VARIANT),gpu)
  STACK := pip install --index-url $(CUDA_INDEX) $(TORCH) fbgemm-gpu==1.8.0
else
  STACK := pip install $(TORCH) fbgemm-gpu-cpu==1.8.0
endif
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/$(STACK) --quiet
	$(BIN)/pip install --quiet --no-deps $(TORCHREC)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -c "import torchrec, fbgemm_gpu, torchrec_sid; print('torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else 'ok')"
	touch $@

demo: setup
	$(BIN)/torchrec-sid demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/pip install --quiet -e '.[test,bench]'
	for script in benchmarks/[a-z]*.py; do [ "$$script" = benchmarks/common.py ] || $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV)
