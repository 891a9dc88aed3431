# btrdelta: `make demo` and `make test` do all set-up on a fresh Debian machine (as root).
#: the venv's interpreter: the distribution's python3 where it is 3.11.2 or newer (Debian's is
#: built with PGO and LTO: a small in-place send takes 9-15 % less CPU than on a plain
#: source build such as pyenv's, which a PATH may put first; docs/performance.md), else
#: python3 on PATH; `make PY=...` chooses another (a venv that exists is kept whatever made
#: it: `make clean` first)
PY      ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11, 2))' \
             2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

PREFIX  ?= /usr/local
SHARE_FILES := $(wildcard share/man/man1/*.1) share/bash-completion/completions/btrdelta \
               share/zsh/site-functions/_btrdelta

.PHONY: all sysdeps sysdeps-demo venv demo test lint bench vmtest soak fuzz randwork fsstress matrix clean cli-files install-cli-files sizes
all: test

sysdeps:
	@PY=$(PY) scripts/sysdeps.sh

#: the demo's packages only (and the venv's build): `make demo` on a fresh machine does not
#: wait for the tests' peers (chromium, qemu-utils, nginx, ...), which `make test` installs
sysdeps-demo:
	@PY=$(PY) scripts/sysdeps.sh --demo

#: the C accelerators (and _hugepages.c) and the header they share (scripts/gen_constants.py
#: writes it)
CSRC    := $(wildcard src/btrdelta/*.c src/btrdelta/*/*.c) src/btrdelta/_constants.h
#: send/_blockhash.c needs xxHash's header (the build skips it without): a venv made before
#: it was installed is built again once (the marker is new then; the header's own time is
#: its package's). The build leaves the marker where the header was there: make reads this
#: file before `sysdeps` installs the header, and `make test` after the first `make demo`
#: built the venv a second time
XXHASH  := $(if $(wildcard /usr/include/xxhash.h),$(VENV)/.xxhash)

$(VENV)/.xxhash:
	@mkdir -p $(VENV) && touch $@

#: the byte code of every module is compiled, as a wheel's install leaves it: an editable
#: install compiles nothing, and with PYTHONDONTWRITEBYTECODE=1 every process (each CLI
#: test's) would compile every module it imports at its start
$(STAMP): pyproject.toml setup.py $(CSRC) $(XXHASH)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null
	@$(BIN)/python -m pip install -q -e '.[all,test,dev]'
	@$(BIN)/python -m compileall -q src >/dev/null
	@if [ -f /usr/include/xxhash.h ]; then touch $(VENV)/.xxhash; fi
	@touch $(STAMP)

# man pages and completions into the venv (an editable install skips data files)
$(VENV)/.cli-files: $(STAMP) $(SHARE_FILES)
	@$(MAKE) -s install-cli-files PREFIX=$(CURDIR)/$(VENV)
	@touch $@

#: `python -m venv` (3.11) installs setuptools, whose distutils-precedence.pth imports
#: _distutils_hack at the start of every process of the venv and puts a finder before each
#: import (~0.5 ms of every btrdelta command): the package's build takes its own setuptools
#: (pip's build isolation: pyproject.toml), so the venv has none (tests/test_venv.py)
$(VENV)/.no-setuptools: $(STAMP)
	@if $(BIN)/python -m pip show -q setuptools >/dev/null 2>&1; then \
		$(BIN)/python -m pip uninstall -q -y setuptools; fi
	@touch $@

venv: $(STAMP) $(VENV)/.cli-files $(VENV)/.no-setuptools

demo: sysdeps-demo venv
	@PATH="$(CURDIR)/$(BIN):$$PATH" scripts/demo.sh

# pytest's temporary directories live in a fresh directory of this run only (never the
# shared /tmp/pytest-of-USER, whose cleanup of other runs' trees can fail) and are removed
# after it, pass, fail or killed (trap; the exit code is 128 + the signal's number, as the
# CLI's); `rm -rf` deletes trees of any depth. In /var/tmp, on the disk: the tests' trees
# held ~5 GB by the run's end (session 25), and /tmp is a tmpfs in RAM on some machines
# (Debian 13's default), where the `where` fixture's disk case would be a tmpfs too; the
# removal says so, with the size (scripts/cleanup.sh: it takes ~30 s after the summary)
test: sysdeps venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	@tmp=$$(mktemp -d /var/tmp/btrdelta-test.XXXXXX); \
	trap 'scripts/cleanup.sh "make test" "$$tmp"' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP; \
	$(BIN)/python -m pytest --basetemp="$$tmp/t"

# The long targets below (not part of `make test`) say what they run and when they started,
# and run with CI=true: a test that cannot run here (no btrfs, no Debian trees) fails
# instead of passing as a skip. Durations: README, Tests; docs/testing.md.

# power cuts in qemu (docs/device.md §9): not part of `make test` (tens of minutes under TCG)
vmtest: sysdeps venv
	@PY=$(PY) scripts/sysdeps.sh --vm
	@echo "vmtest: $${BTRDELTA_VMTEST_RUNS:-12} power cuts each of device install, factory" \
		"reset, backup, restore, image clone, update and replicate (both sides) in qemu (KVM if" \
		"it boots, else TCG: ~46 min on 2 cores), seed $${BTRDELTA_VMTEST_SEED:-from the clock}," \
		"kernel and images (~3 GB) in $${BTRDELTA_VM_CACHE:-/var/tmp/btrdelta-vm};" \
		"started $$(date -u '+%F %T') UTC"
	@exec env BIN=$(BIN) BTRDELTA_VMTEST=1 scripts/longrun.sh vmtest -s \
		tests/device/test_powercut.py tests/device/test_powercut_net.py

# The long targets run pytest through scripts/longrun.sh (CI=true, a temporary basetemp removed
# at the end, Ctrl-C exits 130); exec: the shell of the recipe would die of the Ctrl-C first.

# replication soak (tests/update/test_replicate_soak.py): many rounds with cuts; not part of `make test`
soak: sysdeps venv
	@echo "soak: $${BTRDELTA_SOAK_ROUNDS:-30} rounds of replication with cuts," \
		"seed $${BTRDELTA_SOAK_SEED:-1}; started $$(date -u '+%F %T') UTC"
	@exec env BIN=$(BIN) BTRDELTA_SOAK=1 scripts/longrun.sh soak -s tests/update/test_replicate_soak.py

# random workloads against the kernel, every engine (tests/randwork, upstream btrfs/007):
# BTRDELTA_RANDWORK seeds (default 200) from BTRDELTA_RANDWORK_FROM (default 1); make test
# runs 3 of them; not part of `make test`
randwork: sysdeps venv
	@n=$${BTRDELTA_RANDWORK:-200}; k=$${BTRDELTA_RANDWORK_FROM:-1}; \
		echo "randwork: seeds $$k-$$((k + n - 1)); started $$(date -u '+%F %T') UTC"
	@exec env BIN=$(BIN) BTRDELTA_RANDWORK=$${BTRDELTA_RANDWORK:-200} scripts/longrun.sh randwork \
		tests/randwork

# upstream's fsstress (fstests' ltp/fsstress, not shipped here: BTRDELTA_FSSTRESS names the
# program, else fsstress on PATH or /var/tmp/btrdelta-fsstress/fsstress) against the kernel,
# every engine (tests/randwork/test_fsstress.py): BTRDELTA_FSSTRESS_SEEDS seeds (default 40)
# from BTRDELTA_FSSTRESS_FROM (default 1), BTRDELTA_FSSTRESS_OPS operations each (default
# 2000); not part of `make test`
fsstress: sysdeps venv
	@n=$${BTRDELTA_FSSTRESS_SEEDS:-40}; k=$${BTRDELTA_FSSTRESS_FROM:-1}; \
		echo "fsstress: seeds $$k-$$((k + n - 1)), $${BTRDELTA_FSSTRESS_OPS:-2000} operations" \
		"each; started $$(date -u '+%F %T') UTC"
	@exec env BIN=$(BIN) BTRDELTA_FSSTRESS_SEEDS=$${BTRDELTA_FSSTRESS_SEEDS:-40} \
		scripts/longrun.sh fsstress tests/randwork/test_fsstress.py

# every upstream scenario on the filesystems and send options upstream's tests also meet
# (no compression, compress with max_inline=0, lzo, mkfs -O ^no-holes, --no-data, -c without
# -p), every path against the kernel (tests/matrix): BTRDELTA_MATRIX=all or variant names,
# BTRDELTA_MATRIX_ONLY=scenarios; not part of `make test`
matrix: sysdeps venv
	@echo "matrix: variants $${BTRDELTA_MATRIX:-all}, scenarios $${BTRDELTA_MATRIX_ONLY:-all};" \
		"started $$(date -u '+%F %T') UTC"
	@exec env BIN=$(BIN) BTRDELTA_MATRIX=$${BTRDELTA_MATRIX:-all} scripts/longrun.sh matrix tests/matrix

# damaged inputs through the CLI (tests/cli/test_mutations.py) and the device state file
# (tests/device/test_state_file.py) at 1,000 offsets per input and command instead of make
# test's 24, and 1,000 streams of hostile records of each kind
# (tests/cli/test_hostile_records.py) (~34 minutes at load 6-14 on 2 cores, session 12);
# not part of `make test`
fuzz: sysdeps venv
	@echo "fuzz: $${BTRDELTA_MUTATIONS:-1000} mutations per input and command;" \
		"started $$(date -u '+%F %T') UTC"
	@exec env BIN=$(BIN) BTRDELTA_MUTATIONS=$${BTRDELTA_MUTATIONS:-1000} scripts/longrun.sh fuzz \
		tests/cli/test_mutations.py tests/device/test_state_file.py \
		tests/cli/test_hostile_records.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: sysdeps venv
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks

# build the sdist and wheel, install each profile (core, [make], [hdiff], [image], [fuse],
# [all]) into a fresh venv, print the installed sizes, smoke-test the core install (needs
# the package index; ~2 minutes; not part of `make test`)
sizes: venv
	$(BIN)/python scripts/install_sizes.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# man pages, bash/zsh completion (from the parser) and the README exit-code table (from
# errors.py): committed; a test checks them
cli-files: venv
	$(BIN)/python scripts/gen_cli_files.py

# install them under $(DESTDIR)$(PREFIX)/share (a wheel installs them under its prefix too)
install-cli-files:
	install -d $(DESTDIR)$(PREFIX)/share/man/man1 \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
	  $(DESTDIR)$(PREFIX)/share/zsh/site-functions
	install -m 644 share/man/man1/*.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 644 share/bash-completion/completions/btrdelta \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions/
	install -m 644 share/zsh/site-functions/_btrdelta $(DESTDIR)$(PREFIX)/share/zsh/site-functions/
