# Two commands do all set-up on a fresh machine; each creates or refreshes .venv from requirements.txt.
#   make book   build the book (HTML in _build/html)
#   make test   run the whole test suite: unit tests, kernel tests and every notebook under nbval
VENV   := .venv
PYTHON := $(VENV)/bin/python

.PHONY: book test demo lab clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

book: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash .ci/build_book.sh
	@echo "Book built: open _build/html/index.html, or serve it with"
	@echo "  $(PYTHON) -m http.server --directory _build/html 8000   # then visit http://localhost:8000"

test: $(VENV)/.installed
	$(PYTHON) -m pytest

demo: $(VENV)/.installed
	$(PYTHON) -m lecture_kit

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf _build .jupyter_cache
