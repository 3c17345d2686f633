PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test fuzz bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP_RUN): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e . onnxruntime
	touch $@

$(STAMP_TEST): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(BIN)/repfuse convert --arch repvgg_a0 -o build/repvgg_a0.onnx --force

test: $(STAMP_TEST)
	$(BIN)/python -m pytest -q

fuzz: $(STAMP_TEST)
	REPFUSE_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q -s tests/test_fuzz.py

bench: $(STAMP_TEST)
	$(BIN)/python benchmarks/core.py

lint: $(STAMP_TEST)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
