# Two commands on a fresh machine with only Python 3.11+ and make:
#   make run   — embedded nats-server + all services + simulated workers + a short replay
#   make test  — the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# PYTEST_WORKERS=2 runs the suite on two pytest workers (whole files each): ~6 instead of ~10 min
# here, but timing-sensitive tests (a 3-node election, the online round-robin balance) then overlap
# with other files and flaked; 0 (one process) is the default and what CI runs.
PYTEST_WORKERS ?= 0

.PHONY: install run test lint unit integration lock schemas bench clean prometheus

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	@$(BIN)/python -m uv pip sync --quiet --python $(BIN)/python requirements.lock
	@$(BIN)/python -m uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@# xds-protos ships an old copy of opentelemetry/proto/ (no InstrumentationScope) over the same
	@# files as opentelemetry-proto; whichever installs last wins. The OTLP exporters need the latter's.
	@$(BIN)/python -m uv pip install --quiet --python $(BIN)/python --no-deps --reinstall-package opentelemetry-proto \
	  "$$(grep '^opentelemetry-proto==' requirements.lock)"
	@$(BIN)/python -c "import opentelemetry.exporter.otlp.proto.http.trace_exporter, opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)
	@echo "environment ready in $(VENV)"

install: $(STAMP)

# helm + kubectl for the chart and overlay rendering tests (best effort: without them those tests skip)
$(BIN)/helm: tools/fetch-k8s-tools.sh | $(STAMP)
	@tools/fetch-k8s-tools.sh $(BIN) || true

run: $(STAMP)
	$(BIN)/kvr dev

# ruff (rules in pyproject.toml, docs/development.md) and mypy (incremental cache in .mypy_cache)
lint: $(STAMP)
	$(BIN)/ruff check services schemas bench tests deploy tools
	$(BIN)/mypy

test: $(STAMP) $(BIN)/helm lint
	$(BIN)/kvr schemas check
	@$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

unit: $(STAMP)
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

schemas: $(STAMP)
	$(BIN)/kvr schemas export

# Prometheus and promtool for the dashboard/alert checks (tests/deploy/test_prometheus.py), from
# Debian's package; nothing to do when promtool is already there. Needs root and apt-get. On a host
# with systemd the package also starts a prometheus service on :9090 (containers' policy-rc.d stops that).
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@promtool --version | head -1

lock:
	$(BIN)/python -m uv pip compile --quiet pyproject.toml --extra dev -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .kvr .mypy_cache .ruff_cache
