# shimd: build, demo and test.  Every target installs what it needs (Debian
# packages when run as root, the virtualenv, the demo bundle) and is fast when
# nothing is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP_EDITABLE := --config-settings editable_mode=compat
PYTEST_ARGS ?=
# e.g. make bench BENCH_ARGS=--quick
BENCH_ARGS ?=

# Where the demo OCI bundle lives; read by shimd.bundle (and the tests).
SHIMD_DEMO_BUNDLE ?= /var/lib/shimd/demo-bundle
export SHIMD_DEMO_BUNDLE

# runc ships in /usr/sbin, which a non-login PATH may lack.
export PATH := $(PATH):/usr/local/sbin:/usr/sbin:/sbin

# $(call apt_ensure,pkg[:command] ...): install the Debian packages that are
# missing.  A package is present if dpkg says so, or, when a command is
# given, if that command is on PATH.  apt-get update runs only when something
# must be installed.  Not root and something missing: a clear error.
define apt_ensure
missing=""; \
for spec in $(1); do \
  pkg="$${spec%%:*}"; cmd="$${spec#*:}"; [ "$$cmd" = "$$spec" ] && cmd=""; \
  if [ -n "$$cmd" ] && command -v "$$cmd" >/dev/null 2>&1; then continue; fi; \
  if dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q 'ok installed'; then continue; fi; \
  missing="$$missing $$pkg"; \
done; \
if [ -n "$$missing" ]; then \
  if [ "$$(id -u)" != 0 ]; then \
    echo "error: missing Debian packages:$$missing" >&2; \
    echo "       run 'sudo make $@' or: sudo apt-get install$$missing" >&2; \
    exit 1; \
  fi; \
  echo ">>> installing Debian packages:$$missing"; \
  apt-get update -qq; \
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
fi
endef

.PHONY: all deps venv bundle demo test lint bench clean distclean

all: test

deps:
	@$(call apt_ensure,runc:runc busybox-static)

# The interpreter: python3 and its venv module (Debian splits ensurepip out
# into python3-venv).
$(VPY):
	@if ! command -v $(PYTHON) >/dev/null 2>&1 || ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  $(call apt_ensure,python3 python3-venv); \
	fi
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp: setup.py | $(VPY)
	@if ! $(VPY) -c 'import sys, pip; sys.exit(tuple(int(x) for x in pip.__version__.split(".")[:2]) < (23, 1))' 2>/dev/null; then \
	  echo ">>> upgrading pip"; $(VPY) -m pip install -q --upgrade pip; \
	fi
	$(VPY) -m pip install -q -e '.[test]' $(PIP_EDITABLE)
	$(VPY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@touch $@

venv: $(VENV)/.stamp

bundle: deps venv
	@$(VPY) -m shimd.bundle

demo: deps venv bundle
	@$(VENV)/bin/shimd --help >/dev/null || { echo "error: shimd cannot run" >&2; exit 1; }
	@# The container's exit code is shown but does not fail the target; 125 is
	@# the shim's own failure (the docker/podman convention) and does.
	@rc=0; $(VENV)/bin/shimd run || rc=$$?; \
	 echo "exit code: $$rc"; \
	 if [ $$rc -eq 125 ]; then echo "error: shimd run failed" >&2; exit $$rc; fi

test: deps venv bundle
	$(VPY) -m pytest tests -v -rs $(PYTEST_ARGS)

# Type checks: mypy, strict, with mypy-zope (settings in mypy.ini).
lint: venv
	@if ! $(VPY) -c 'import mypy, mypy_zope' 2>/dev/null; then \
	  echo ">>> installing mypy and mypy-zope"; \
	  $(VPY) -m pip install -q -e '.[lint]' $(PIP_EDITABLE); \
	fi
	$(VENV)/bin/mypy

$(VENV)/.bench-stamp: $(VENV)/.stamp setup.py
	$(VPY) -m pip install -q -e '.[bench]' $(PIP_EDITABLE)
	@touch $@

# The shim's bytecode is compiled first, as an installed package's is: with
# PYTHONDONTWRITEBYTECODE in the environment every shim would compile
# shimd at start-up and the start latency would measure the compiler.
bench: deps venv $(VENV)/.bench-stamp
	@$(call apt_ensure,conmon:conmon)
	@$(VPY) -m compileall -q shimd
	$(VPY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info _trial_temp* .pytest_cache .coverage .coverage.* htmlcov
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name dropin.cache \) -print0 | xargs -0 rm -rf

# Also removes the virtualenv and the demo bundle.
distclean: clean
	rm -rf $(VENV) $(SHIMD_DEMO_BUNDLE)
