# txmail: `make demo` shows it working, `make test` proves it. Both set up what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
# Debian packages the tests and the demo use: Postfix's smtp-sink/smtp-source, swaks (with
# libnet-ssleay-perl for its TLS); knot (a real DNS server the tests run on loopback, with dynamic
# updates: tests/dns_server.py); for the node tier and the image: containerd, runc, the CNI
# plugins, iptables and conntrack (kube-proxy), mmdebstrap and umoci (make image), gcc and
# libc6-dev (the static pause binary), iproute2, util-linux and procps (namespaces, ss, sysctl,
# pgrep).
DEBS   := postfix swaks libnet-ssleay-perl knot containerd runc containernetworking-plugins iptables \
          conntrack mmdebstrap umoci gcc libc6-dev iproute2 util-linux procps
# Only `make bench-relay` needs these (bench/relay_vs_postfix.py): Postfix with Cyrus SASL (its
# saslpasswd2, the PLAIN/LOGIN mechanisms, the sasldb plugin), wrk and nginx for the click
# redirect, strace for the fsync counts.
BENCH_DEBS := postfix sasl2-bin libsasl2-modules libsasl2-modules-db wrk nginx-light strace

.PHONY: help setup debs control-plane crds lint test test-unit test-k8s test-node demo clean image lock \
        bench-operator bench-relay bench-debs fuzz

help:
	@echo "make demo           helm install on a local node, then a tracked mail end to end"
	@echo "make test           set everything up, then lint and run the whole test suite"
	@echo "make lint           ruff, mypy --strict, import-linter"
	@echo "make fuzz           the parser fuzz targets (tests/fuzz) with thousands of examples each"
	@echo "make crds           regenerate crds/ and the chart's CRD templates from the API models"
	@echo "make chart-lint     helm lint --strict charts/txmail with each values file of tests/chart"
	@echo "make control-plane  build the control plane, the node parts and Helm from Go modules (cached)"
	@echo "make image          build the container image as an OCI archive, no registry or Docker (cached)"
	@echo "make lock           re-pin requirements.lock and image/build-requirements.lock (with hashes)"
	@echo "make bench-operator the operator at N SmtpTokens: BENCH_ARGS='--tokens 1000 5000' (docs/performance.md)"
	@echo "make bench-relay    the relay against a private Postfix, side by side: BENCH_ARGS='--quick' (docs/performance.md)"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "txmail needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed debs

debs:
	@missing=0; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages: $(DEBS)"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS) >/dev/null; \
	    service postfix stop >/dev/null 2>&1 || true; service containerd stop >/dev/null 2>&1 || true; \
	    service knot stop >/dev/null 2>&1 || true; \
	  else \
	    echo "Please install the Debian packages $(DEBS) (as root: apt-get install $(DEBS))"; exit 1; \
	  fi; \
	fi

control-plane:
	@tests/cluster/build.sh >/dev/null

# The image's pins: runtime dependencies of pyproject.toml (requirements.lock) and the build backend
# of txmail's own wheel (image/build-requirements.lock), for bookworm's CPython 3.11 on x86_64.
# Existing pins stay unless pyproject.toml rules them out; `make lock LOCK_ARGS=--upgrade` moves
# every pin to the newest release.
UV_VERSION := 0.13.9
LOCK := --python-version 3.11 --python-platform x86_64-manylinux_2_36 --generate-hashes \
        --custom-compile-command 'make lock' --quiet $(LOCK_ARGS)
lock: $(VENV)/.installed
	@$(VENV)/bin/uv --version 2>/dev/null | grep -qx 'uv $(UV_VERSION).*' || \
	  $(PY) -m pip install --quiet 'uv==$(UV_VERSION)'
	$(VENV)/bin/uv pip compile $(LOCK) pyproject.toml -o requirements.lock
	$(VENV)/bin/uv pip compile $(LOCK) image/build-requirements.in -o image/build-requirements.lock

image: setup
	@image/build.sh

crds: $(VENV)/.installed
	$(PY) -m txmail_operator.api.crd crds --chart charts/txmail

# The real Helm (built by tests/cluster/build.sh) lints the chart with every valid values file.
.PHONY: chart-lint
chart-lint:
	@helm=$$(tests/cluster/build.sh)/helm && for v in defaults everything watch-namespaces; do \
	  $$helm lint --strict charts/txmail --namespace txmail-system --values tests/chart/values/$$v.yaml || exit 1; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check operator relay tests bench
	$(VENV)/bin/ruff format --check operator relay tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup control-plane image lint
	$(VENV)/bin/pytest

test-unit: $(VENV)/.installed
	$(VENV)/bin/pytest -m 'not k8s and not node'

test-k8s: setup control-plane
	$(VENV)/bin/pytest -m k8s

test-node: setup control-plane image
	$(VENV)/bin/pytest -m node

# The fuzz targets run with a few examples each in `make test`; here with thousands (minutes).
# Failing examples are kept in .hypothesis/ and replayed first by every later run.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest tests/fuzz -q $(FUZZ_ARGS)

demo: setup control-plane image
	$(PY) tests/demo.py

# A benchmark, not a test: minutes per token count, figures in docs/performance.md.
BENCH_ARGS ?=
bench-operator: $(VENV)/.installed control-plane
	$(PY) bench/operator_scale.py $(BENCH_ARGS)

# The relay against Postfix (minutes, as root: Postfix's private instance needs it). The bench
# packages are installed as `debs` installs its own; the services they start are stopped.
bench-debs:
	@missing=0; for p in $(BENCH_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages: $(BENCH_DEBS)"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BENCH_DEBS) >/dev/null; \
	    for s in postfix nginx saslauthd; do service $$s stop >/dev/null 2>&1 || true; done; \
	  else \
	    echo "Please install the Debian packages $(BENCH_DEBS) (as root: apt-get install $(BENCH_DEBS))"; exit 1; \
	  fi; \
	fi

bench-relay: setup bench-debs
	$(PY) bench/relay_vs_postfix.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
