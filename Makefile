# Every target sets itself up on a fresh machine: the virtual environment is
# created and the project installed (with test extras) when missing or when
# pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint format protos bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/meshserve up

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: install
	$(PY) -m protos.generate

# Triton (nvidia-pytriton) needs numpy<2 and protobuf<7, which meshserve's
# environment cannot hold: the benchmark runs it from a venv of its own.
TRITON_VENV ?= .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

$(TRITON_STAMP): bench/requirements-triton.txt
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet -r bench/requirements-triton.txt
	@touch $(TRITON_STAMP)

bench: install $(TRITON_STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench.run_all --triton-python $(TRITON_VENV)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache .ruff_cache build *.egg-info
