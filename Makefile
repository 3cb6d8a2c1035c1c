# Everything a fresh machine needs: `make demo` and `make test`.
PYTHON        ?= python3
VENV          ?= .venv
# A torch version that exists everywhere; on these machines it is a local CPU wheel.
# Override for CUDA builds, e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC    ?= torch==$(TORCH_VERSION)
CORES         ?= all
PYTEST_ARGS   ?=
BIN           := $(VENV)/bin
STAMP         := $(VENV)/.prefkd-installed

export PREFKD_WHEEL_DIR ?= $(CURDIR)/.cache/wheels
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PREFKD_CACHE_DIR ?= $(CURDIR)/.cache/prefkd
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: demo test install lint format clean-demo benchmarks

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	. $(BIN)/activate && snakemake --cores $(CORES) && snakemake --report results/demo/report.html

# Two pytest workers, whole files each (module fixtures are built once); the longest files start first
# (tests/conftest.py orders them). TEST_WORKERS=0 runs in one process.
TEST_WORKERS  ?= 2

test: $(STAMP)
	. $(BIN)/activate && python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

LINT_PATHS    := prefkd tests benchmarks

lint: $(STAMP)
	. $(BIN)/activate && ruff check $(LINT_PATHS) && ruff format --check $(LINT_PATHS) \
		&& snakefmt --check workflow && snakemake --lint && snakemake -n --quiet

format: $(STAMP)
	. $(BIN)/activate && ruff check --fix $(LINT_PATHS) && ruff format $(LINT_PATHS) && snakefmt workflow

benchmarks: $(STAMP)
	. $(BIN)/activate && python benchmarks/alignment.py --quick && python benchmarks/signals.py --quick && python benchmarks/student_step.py --quick

clean-demo:
	rm -rf results/demo .snakemake
