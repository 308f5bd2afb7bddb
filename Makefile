# nsiter — every target bootstraps .venv by itself; a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nsiter-installed

.PHONY: test figures bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Coverage is reported for the torch backend only (the Numba kernels are not traced).
TORCH_MODULES := nsiter/_torch/*,nsiter/torch.py

# ruff first (a lint error fails the target), then pytest under coverage (subprocesses
# included, combined): pytest's exit
# status decides; the report runs either way and only fails the target for a real report
# error ("No data to report", e.g. no torch modules in the tree, is not one).
test: $(STAMP)
	$(PY) -m ruff check nsiter analysis tests
	@$(PY) -m coverage erase
	@$(PY) -m coverage run -m pytest -q; status=$$?; \
	$(PY) -m coverage combine -q >/dev/null 2>&1; \
	out=$$($(PY) -m coverage report --include='$(TORCH_MODULES)' 2>&1); report=$$?; \
	echo "$$out"; \
	if [ $$status -eq 0 ] && [ $$report -ne 0 ] && ! echo "$$out" | grep -q "No data to report"; then \
	  status=$$report; fi; \
	exit $$status

# Fig. 5 trains torch layers: the local CPU wheel of torch (a bare "torch" would pull CUDA builds);
# where it is not installable the Fig. 5 script says so and skips
figures: $(STAMP)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0 || echo "torch==2.13.0 not installable here: Fig. 5 is skipped"
	$(PY) analysis/make_figures.py

bench: $(STAMP)
	$(PY) analysis/run_benchmarks.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .coverage .coverage.* build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
