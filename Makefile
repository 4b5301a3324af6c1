# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= digits
# torch/torchvision pinned to the builds this workplace caches on disk (CPU works with the CUDA build).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast lint clean

$(BIN)/chip: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/chip

venv: $(BIN)/chip

demo: venv
	$(BIN)/chip run configs/demo.yaml --data $(DATA) --out-dir runs/demo-$(DATA)

# two workers (the CI machine has two cores); the largest coverage models share one worker
test: venv
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

test-fast: venv
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow" tests

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
