# cshare: the usual entry points. `scripts/install` (as root) sets up the
# Debian packages and the virtual environment these targets use.
PREFIX ?= /usr/local
VENV ?= /opt/cshare/venv
PY := $(VENV)/bin/python
MANDIR := $(PREFIX)/share/man
PAGES1 := $(wildcard man/*.1)
PAGES7 := $(wildcard man/*.7)

.PHONY: install install-man test test-fast bench fuzz man lint demo clean

install:
	./scripts/install

install-man:
	install -d $(MANDIR)/man1 $(MANDIR)/man7
	install -m 0644 $(PAGES1) $(MANDIR)/man1/
	$(if $(PAGES7),install -m 0644 $(PAGES7) $(MANDIR)/man7/)

# The whole suite: root, FUSE, second users and podman tests included.
test:
	$(VENV)/bin/pytest -q tests

# Only what needs neither root nor FUSE.
test-fast:
	$(VENV)/bin/pytest -q tests -m "not root and not fuse and not rootless and not podman"

# The differential fuzzer against the kernel overlay, as long as asked (as root):
# make fuzz SEEDS=200 [OPS=400] [FIRST=0]; CSHARE_OVERLAY_CMD=fuse-overlayfs for that one.
SEEDS ?= 100
OPS ?= 400
FIRST ?= 0
fuzz:
	$(PY) tests/overlay_fuzz.py --seeds $(SEEDS) --ops $(OPS) --first $(FIRST)

# Every benchmark, then one table of all rows (bench/README.md); BENCH_ARGS=--quick for a smoke run.
bench:
	$(PY) -m bench $(BENCH_ARGS)

man:
	$(PY) -m scripts.gen_man man

lint:
	$(VENV)/bin/ruff check cshare cshare_fuse plugins tests bench
	$(VENV)/bin/mypy cshare cshare_fuse plugins
	$(VENV)/bin/lint-imports

demo:
	$(VENV)/bin/cshare demo

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
