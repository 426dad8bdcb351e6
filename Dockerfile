# megrez-search on the official vLLM image at the pinned version (CUDA, GPU hosts).
#   docker compose up            (see docker-compose.yml and .env.example)
# The image's vLLM, torch and CUDA stay as they are; only this package and its own dependencies are added.

# The web page, bundled with Node (the npm packages from the lock file); only its built files go on.
FROM node:20-slim AS web
WORKDIR /web
COPY api/web/package.json api/web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY api/web/build.mjs ./
COPY api/web/src ./src
RUN npm run build

FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY engine ./engine
COPY retrieval ./retrieval
COPY api ./api
COPY prompts ./prompts
COPY --from=web /web/dist ./api/web/dist
# No extras: vllm==0.32.0 is already in the image (the `gpu` extra would only pin it again).
RUN pip install --no-cache-dir . \
 && useradd --create-home --uid 10001 megrez \
 && mkdir -p /models \
 && chown megrez /models

# Weights live in a volume: downloaded once on first start (or mounted from the host), kept across rebuilds.
ENV HF_HOME=/models \
    MEGREZ_ENGINE__BACKEND=vllm \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
USER megrez
EXPOSE 8000

# /readyz is 503 while the model loads; the long start period covers a first download of the weights.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"

ENTRYPOINT ["megrez-search", "serve", "--host", "0.0.0.0", "--port", "8000"]
