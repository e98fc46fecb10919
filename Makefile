# atlas-sidecar: the two commands a newcomer needs are `make demo` and `make test`.
# Everything else is installed here, into .venv and .tools, never by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TOOLS := $(CURDIR)/.tools
BUF_VERSION ?= v1.50.0
BUF := $(TOOLS)/bin/buf
STAMP := $(VENV)/.installed
PROTO_OUT := clients/python/atlas_sidecar_client/_proto sidecar/control/adapters/_proto

.PHONY: install proto proto-check buf run demo test lint bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e clients/python -e '.[dev,demo]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the client and the daemon (idempotent)

proto: $(STAMP)  ## regenerate the Python code from proto/ (deletes the old output first)
	$(PY) scripts/gen_proto.py

proto-check: proto  ## fail when the committed generated code is stale
	@git diff --exit-code --stat -- $(PROTO_OUT) || (echo "generated code is stale: run 'make proto' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- $(PROTO_OUT))" || (git status --porcelain -- $(PROTO_OUT); echo "generated code is stale: run 'make proto' and commit"; exit 1)

$(BUF):
	GOBIN=$(TOOLS)/bin GOFLAGS=-mod=mod go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)

buf: $(BUF)  ## install buf at the pinned version

run: $(STAMP)  ## run the daemon with defaults (gRPC 127.0.0.1:50051, HTTP 127.0.0.1:9464)
	$(VENV)/bin/atlas-sidecar serve

demo: $(STAMP)  ## the whole loop on one machine
	$(VENV)/bin/atlas-sidecar demo

test: $(STAMP)  ## every test (unit, integration, end-to-end)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP) $(BUF) proto-check  ## ruff, mypy --strict, buf lint, stale generated code
	$(VENV)/bin/ruff format --check sidecar clients/python tests bench scripts
	$(VENV)/bin/ruff check sidecar clients/python tests bench scripts
	$(VENV)/bin/mypy sidecar clients/python/atlas_sidecar_client
	cd proto && $(BUF) lint

bench: $(STAMP)  ## benchmarks; each prints one comparable figure
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## remove build output and local data (keeps .venv)
	rm -rf var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
