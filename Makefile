# The two commands: `make book` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WEB := book/_web
SETUP_DONE := $(VENV)/.setup-done
WEB_DONE := $(WEB)/site/.done
# Trained float networks are cached here, keyed by configuration and seed (see qlib.train.pretrained).
export QLIB_CACHE_DIR ?= $(CURDIR)/_build/qlib-cache

.PHONY: book test unit bench setup clean

book: setup  ## execute every chapter (cached) and write _build/html
	$(VENV)/bin/jupyter-book build . --builder html
	@echo "Open _build/html/index.html"

test: setup  ## unit + property tests, the book built from clean (-W -n), the browser check
	$(PY) -m pytest

unit: setup  ## the fast tests only (no book build, no browser)
	$(PY) -m pytest -m "not book and not browser"

bench: setup  ## benchmark tables (ratios measured side by side in one process)
	$(PY) bench/quantize.py
	$(PY) bench/engine.py
	$(PY) bench/qat_overhead.py
	$(PY) bench/float_baselines.py

setup: $(SETUP_DONE) $(WEB_DONE)

$(SETUP_DONE): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Offline web assets from pinned npm packages (package-lock.json): MathJax 3, require.js and the
# ipywidgets HTML manager, staged for Sphinx's html_extra_path.
$(WEB_DONE): $(WEB)/package.json $(WEB)/package-lock.json $(WEB)/widgets-config.js
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	rm -rf $(WEB)/site && mkdir -p $(WEB)/site/assets/html-manager
	cp -r $(WEB)/node_modules/mathjax/es5 $(WEB)/site/assets/mathjax
	cp $(WEB)/node_modules/requirejs/require.js $(WEB)/widgets-config.js $(WEB)/site/assets/
	cd $(WEB)/node_modules/@jupyter-widgets/html-manager/dist && \
	  cp embed-amd.js *.woff *.woff2 *.ttf *.eot *.svg $(CURDIR)/$(WEB)/site/assets/html-manager/
	touch $@

clean:
	rm -rf _build
