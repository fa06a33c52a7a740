# Two entry points for newcomers (see README):  make speedrun   and   make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0   # CPU wheel; GPU users: see docs/install.md
OUT ?= runs/speedrun
# llama-cpp-python (test extra) compiles llama.cpp from source once; pip caches the wheel (~/.cache/pip) after that.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# llama.cpp's server: QUICK=1 builds its HTTP/JSON helpers at -O0/-O1 (the model's arithmetic stays -O3)
LLAMA_SERVER_QUICK ?= 1

.PHONY: setup speedrun test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/python -m pip install -q "$(strip $(TORCH_PIN))"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(BIN)/python -m pip install -q -e ".[all,test]"  # every extra (kfoundry/extras.py) and the test tools
	$(BIN)/kfoundry eval --install-lm-eval-plugin >/dev/null  # `lm_eval --model kfoundry` (lm-eval 0.4 has no plugin discovery)
	PY=$(BIN)/python JOBS=$(JOBS) QUICK=$(LLAMA_SERVER_QUICK) scripts/build_llama_server.sh $(BIN)  # `kfoundry serve --engine llama.cpp`; cached per machine

speedrun: setup
	$(BIN)/kfoundry speedrun --out $(OUT)

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
