# Two commands: `make run` (check every kernel; benchmark too when a GPU is present; build the
# dashboard from results/) and `make test`. Both install into .venv first. On a machine without a GPU and without torch,
# the CPU build of torch is installed; a machine that has torch (e.g. a CUDA build) keeps it.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: install
	$(VENV)/bin/kwb check
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(VENV)/bin/kwb bench; \
	else \
		echo "No GPU: kernels were checked through the Triton interpreter; benchmarks need a GPU."; \
	fi
	$(VENV)/bin/kwb dashboard -o report.html

test: install
	$(PY) -m pytest tests -q
