# Two entry points for a fresh machine with Python 3.11:
#   make demo   installs everything into .venv/ and runs the local demo (a swarm plus training)
#   make test   installs everything into .venv/ and runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo test lint proto image-offline clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade "pip>=24"
	# torch first, pinned, so that nothing pulls a multi-GB CUDA build
	$(VENV)/bin/pip install --quiet "torch==2.13.0"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dmoe demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Regenerate the gRPC stubs after editing proto/dmoe/v1/*.proto (the stubs are committed).
proto: $(STAMP)
	$(VENV)/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/dmoe/v1/tensor.proto proto/dmoe/v1/expert.proto proto/dmoe/v1/p2p.proto \
		&& rm -f proto/dmoe/v1/tensor_pb2_grpc.py proto/dmoe/v1/p2p_pb2_grpc.py

# The dmoe:latest image without a container registry or a package index in the build (root, Docker, debootstrap):
# a Debian base image and a wheelhouse of the pinned dependencies, both cached in /var/cache/dmoe (deploy/).
# With registry access, `docker build -t dmoe .` (on python:3.11-slim) is enough.
image-offline:
	deploy/build-image-offline.sh dmoe:latest

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
