# neozodb developer commands.  `make run` starts a local cluster, `make test`
# runs the whole suite; both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test interop lint bench bench-all clean compile

$(STAMP): pyproject.toml
	@# FUSE (fusermount, libfuse2) for the power-loss tests (tests/durability)
	{ command -v fusermount && /sbin/ldconfig -p | grep -q 'libfuse\.so\.2'; } >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse libfuse2; }
	@# ip (iproute2) and iptables for the network-fault tests (tests/net)
	{ export PATH="$$PATH:/usr/sbin:/sbin"; command -v ip && command -v iptables-restore; } >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables; }
	@# MariaDB server (and its RocksDB engine) and Connector/C (the mariadb
	@# driver builds on it, and mysqlclient with pkg-config: RelStorage's and
	@# NEO's driver) for the MariaDB backend's tests; PostgreSQL 15's
	@# binaries are on the machine
	{ export PATH="$$PATH:/usr/sbin:/sbin"; command -v mariadbd && command -v mariadb_config && command -v pkg-config && test -e /usr/lib/mysql/plugin/ha_rocksdb.so; } >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server mariadb-plugin-rocksdb libmariadb-dev pkg-config; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

# An editable install leaves the sources uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set every node process would compile them
# again at its start (70 ms of CPU each): compiled once here, as a
# regular install does.
compile: $(STAMP)
	@$(BIN)/python -m compileall -q src

run: compile
	$(BIN)/neosimple --storages 2 --replicas 1 --partitions 12 var

# test processes side by side (pytest-xdist; 0: one process)
TEST_WORKERS ?= 2

test: compile
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

# NEO (github Nexedi/neoppod) as a peer: NEO_SRC=/path/to/neoppod
interop: $(STAMP)
	@test -f "$(NEO_SRC)/neo/lib/protocol.py" || { echo "make interop: NEO_SRC must name NEO's source directory" >&2; exit 2; }
	$(BIN)/pip install -q -e '.[interop]'
	NEO_SRC="$(abspath $(NEO_SRC))" $(BIN)/python -m pytest -q tests/interop

bench: compile
	$(BIN)/python bench/bench.py

# every measure of issue 12 in one run (about 20 minutes on 2 cores); see bench/README.md
bench-all: compile
	$(BIN)/python bench/bench.py --all

clean:
	rm -rf $(VENV) var build src/*.egg-info
