VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLUSTER_STAMP := $(VENV)/.installed-cluster

.PHONY: install install-cluster test test-fast lint run clean-run

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

# The `cluster` extra (kfp, for `cts kfp`): the tests need it, `make run` does not.
install-cluster: $(CLUSTER_STAMP)

$(CLUSTER_STAMP): $(STAMP)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c $(VENV)/constraints.txt -e ".[test,cluster]" \
		|| $(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[test,cluster]"
	touch $(CLUSTER_STAMP)

# Two pytest workers (xdist): while one waits on a subprocess's imports or a server, the other
# computes. Each test module runs on one worker (--dist loadscope), so a module-scoped
# fixture (a pipeline run, a trained reference) is built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: install-cluster
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The suite without its end-to-end tests (marker e2e: dvc repro, the KFP local run,
# multi-process trainings, cts stage commands): a minute or two instead of ten.
test-fast: install-cluster
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/check_sizes.py

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "metrics:   metrics/*.json  (PATH=$(BIN):\$$PATH dvc metrics show)"
	@echo "plots:     PATH=$(BIN):\$$PATH dvc plots show  -> dvc_plots/index.html"
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db  -> $$($(BIN)/cts ui)"
