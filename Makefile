# Two commands do all set-up on a fresh machine; each creates or refreshes .venv from requirements.txt.
#   make book   build the book (HTML in _build/html)
#   make test   run the whole test suite: unit tests, kernel tests and every notebook under nbval
# CPU=1 (e.g. make test CPU=1) installs PyTorch's CPU build from PyTorch's own index instead of the
# CUDA build that PyPI serves on Linux: for a machine without an NVIDIA GPU, 2.2 GB less to download.
VENV   := .venv
PYTHON := $(VENV)/bin/python
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell sed -n 's/^\(torch==[^ ;#]*\).*/\1/p' requirements.txt)
# JupyterLab refuses to start as root (containers, Colab-like machines) unless told it may.
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: book test demo lab clean venv

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(if $(CPU),$(PYTHON) -m pip install --quiet --index-url $(CPU_INDEX) "$(TORCH_PIN)")
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

# The environment, checked against CPU=1: a .venv that already holds the CUDA build is not changed
# behind your back, so say how to replace it.
venv: $(VENV)/.installed
ifdef CPU
	@$(PYTHON) -c "import sys, torch; sys.exit(torch.version.cuda is not None)" || { \
	  echo "CPU=1, but $(VENV) already holds PyTorch's CUDA build: remove it (rm -rf $(VENV)) and run make again"; \
	  exit 1; }
endif

book: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash .ci/build_book.sh
	@echo "Book built: open _build/html/index.html, or serve it with"
	@echo "  $(PYTHON) -m http.server --directory _build/html 8000   # then visit http://localhost:8000"

test: venv
	$(PYTHON) -m pytest

demo: venv
	$(PYTHON) -m lecture_kit

lab: venv
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ROOT)

clean:
	rm -rf _build .jupyter_cache
