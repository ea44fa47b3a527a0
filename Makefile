# splitkeras: `make train` (quickstart) and `make test` do all set-up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A second environment without TensorFlow, for the edge client and its test.
EDGE_VENV ?= .venv-edge
FASHION_MNIST := /usr/share/datasets/fashion-mnist
WORKDIR ?= workdirs/fashion_mnist_lenet
# pytest worker processes (pytest-xdist); one test file stays on one worker,
# so its module-level fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: install edge data train test lint format benchmark proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[tf,edge,test]"
	touch $@

# splitkeras[edge] alone: what a device installs (tests/edge checks that
# TensorFlow cannot be imported there).
edge: $(EDGE_VENV)/.installed

$(EDGE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/python -m pip install --quiet -e ".[edge]"
	touch $@

# Real Fashion-MNIST IDX files from Debian; without them the quickstart falls
# back to TFDS, which needs internet.
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "note: $(FASHION_MNIST) missing; run 'sudo apt-get install dataset-fashion-mnist' or let TFDS download fashion_mnist"; \
	  fi; \
	fi

train: install data
	$(VENV)/bin/splitkeras train --config=fashion_mnist_lenet --workdir=$(WORKDIR)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint edge
	SPLITKERAS_EDGE_PYTHON=$(EDGE_VENV)/bin/python $(PY) -m pytest tests -x -q -n $(TEST_WORKERS) --dist loadfile

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

benchmark: install
	$(PY) benchmarks/throughput.py

# Regenerates the checked-in wire format code from its .proto.
proto: install
	$(PY) -m pip install --quiet grpcio-tools
	$(PY) -m grpc_tools.protoc -I. --python_out=. splitkeras/transport/proto/wire.proto

clean:
	rm -rf $(VENV) $(EDGE_VENV) workdirs build *.egg-info
