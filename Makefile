# Everything a fresh machine needs, from nothing. `make test` runs the tests, `make demo` the demo model.
PYTHON ?= python3
VENV := .venv
TF4_VENV := .venv-tf4
# A bare `torch` requirement pulls a multi-GB CUDA build; install the CPU build first. Override on GPU machines:
# make test TORCH=torch
TORCH ?= torch==2.13.0
PIP_QUIET ?= -q

.PHONY: install test demo demo-model bench clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) --upgrade pip
	$(VENV)/bin/pip install $(PIP_QUIET) "$(TORCH)"
	$(VENV)/bin/pip install $(PIP_QUIET) -e .
	touch $@

# lmms-eval is the scoring reference of the eval tests (its task code is imported and compared with ours). Its own
# requirements pull torchvision (which breaks the CPU torch build) and much more that its task code does not need,
# so it is installed without them; the test extra has the few its task code imports.
LMMS_EVAL ?= lmms-eval==0.7.3

$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(VENV)/bin/pip install $(PIP_QUIET) -e '.[test]'
	$(VENV)/bin/pip install $(PIP_QUIET) --no-deps "$(LMMS_EVAL)"
	touch $@

# transformers 4.x, only to write test checkpoints in the 4.x on-disk layout (the llava-hf Hub repos' layout)
$(TF4_VENV)/.done:
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/pip install $(PIP_QUIET) "$(TORCH)"
	$(TF4_VENV)/bin/pip install $(PIP_QUIET) transformers==4.57.6 pillow
	touch $@

install: $(VENV)/.runtime

test: $(VENV)/.test $(TF4_VENV)/.done
	LLAVA_NEXT_TF4_PYTHON=$(CURDIR)/$(TF4_VENV)/bin/python $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# three questions about a bundled image (a red circle, a yellow triangle, an orange square) for the demo model
DEMO_QUESTIONS := "What color is the circle?" "What shape is orange?" "How many shapes are there?"
demo: $(VENV)/.runtime
	@for q in $(DEMO_QUESTIONS); do \
	  printf '%s ' "$$q"; $(VENV)/bin/llava-next generate --model demo --image examples/shapes.png --prompt "$$q"; \
	done

# retrain the bundled demo model from nothing (about 52 minutes on 2 CPU cores); writes llava_next/demo/model
demo-model: $(VENV)/.runtime
	bash recipes/demo/make_demo_model.sh

# speed and memory against transformers on the same weights and inputs (BENCHMARKS.md); the llama.cpp comparison
# needs the bench extra: $(VENV)/bin/pip install -e '.[bench]' (compiles llama.cpp, ~10 minutes on 2 cores)
# (where that llama.cpp dies on an illegal instruction, benchmarks/bench_llamacpp.py prints the command that
# rebuilds it without the instructions it died on)
bench: $(VENV)/.test
	$(VENV)/bin/python benchmarks/bench_generate.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TF4_VENV) .pytest_cache
