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
	@mkdir -p _build
	@# progress bars are for interactive runs: the built pages leave them out (QLIB_PROGRESS=0)
	set -o pipefail; QLIB_PROGRESS=0 $(VENV)/bin/jupyter-book build . --builder html 2>&1 | tee _build/book.log
	@echo "Chapters executed (seconds; a chapter whose outputs were cached is not listed):"
	@sed -nE 's|^.*/(book/[^ ]+)\.ipynb: Executed notebook in ([0-9.]+) seconds.*$$|  \1  \2|p' _build/book.log
	@echo "Open _build/html/index.html"

test: setup  ## unit + property tests, the book built from clean (-W -n), the browser check
	$(PY) tests/provision_browser.py
	$(PY) -m pytest

unit: setup  ## the fast tests only (no book build, no browser, no training)
	$(PY) -m pytest -m "not book and not browser and not slow"

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

# Node.js and npm, for the web assets below: installed here where that is allowed (root with
# apt-get: a container, CI); elsewhere a message says what to install.
NEED_NPM = command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; \
	  else echo "npm is missing: install Node.js and npm (e.g. sudo apt-get install nodejs npm)" >&2; exit 1; fi; }

# Offline web assets from pinned npm packages (package-lock.json): MathJax 3, require.js and the
# ipywidgets HTML manager, staged for Sphinx's html_extra_path.
$(WEB_DONE): $(WEB)/package.json $(WEB)/package-lock.json $(WEB)/widgets-config.js
	@$(NEED_NPM)
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	rm -rf $(WEB)/site && mkdir -p $(WEB)/site/assets/html-manager
	cp -r $(WEB)/node_modules/mathjax/es5 $(WEB)/site/assets/mathjax
	cp $(WEB)/node_modules/requirejs/require.js $(WEB)/widgets-config.js $(WEB)/site/assets/
	cd $(WEB)/node_modules/@jupyter-widgets/html-manager/dist && \
	  cp embed-amd.js *.woff *.woff2 *.ttf *.eot *.svg $(CURDIR)/$(WEB)/site/assets/html-manager/
	touch $@

clean:
	rm -rf _build
