# The README's two commands: `make demo` and `make test`. Each sets up .venv first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-aiokafka-min lint bench stress clean pods redis-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# what the demo needs: snapbus and the embedded broker
$(VENV)/.installed-broker: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[broker]'
	touch $@

# everything: tests, linters, benchmarks, the sidecar
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-broker

## the main job: simulated pods publish, views follow, convergence and latency summary
demo: $(VENV)/.installed-broker
	$(BIN)/snapbus demo

## the whole test suite: unit and integration tests on Tansu, then the integration tests on
## Apache Kafka with the wire-contract pods (`make pods`; skipped with one line when Java or
## Maven is missing; on CI that fails the run)
test: $(VENV)/.installed-dev redis-tools
	$(BIN)/pytest
	@if reason=$$($(BIN)/python -m snapbus._kafka_broker 2>&1); then \
	  echo "== the integration suite on Apache Kafka ($$reason)"; \
	  $(MAKE) --no-print-directory pods || exit 1; \
	  SNAPBUS_TEST_ENGINE=kafka $(BIN)/pytest -m "integration or kafka"; \
	elif [ -n "$$CI" ]; then \
	  echo "error: the Kafka leg cannot run: $$reason" >&2; exit 1; \
	else \
	  echo "note: the Kafka leg of the tests did not run: $$reason"; \
	fi

## redis-server and redis-cli for tests/test_resp.py (the Redis-protocol sidecar's peers), from
## Debian's packages when missing; a failed install fails the tests, never skips them
redis-tools:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  echo "== installing redis-server, redis-tools (apt-get)"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq && \
	  $$sudo apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null; }

## the lowest aiokafka pyproject.toml allows (`make test` runs the highest): the unit tests, then
## the reader, view, replay, publisher and transaction integration tests on Tansu and again on
## Apache Kafka (with the `kafka` tests among them; the Kafka step as in `make test`: one line
## when Java or Maven is missing, a failure on CI), in a venv of their own (without the
## benchmark peers: ktables needs aiokafka>=0.13); docs/adr/0002-aiokafka-range-tested.md
AIOKAFKA_MIN := 0.11.0
VENV_MIN     := .venv-aiokafka-min
$(VENV_MIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/python -m pip install --quiet -e '.[test]' 'aiokafka==$(AIOKAFKA_MIN)'
	touch $@

MIN_TESTS := tests/test_aiokafka.py tests/test_view.py tests/test_reader_corruption.py \
  tests/test_transactions.py tests/test_replay.py tests/test_topic.py tests/test_publisher.py \
  tests/test_checkpoint.py
test-aiokafka-min: $(VENV_MIN)/.installed redis-tools
	@echo "== aiokafka $$($(VENV_MIN)/bin/python -c 'import aiokafka; print(aiokafka.__version__)'): unit tests"
	$(VENV_MIN)/bin/pytest -q -p no:cacheprovider -m "not integration and not kafka"
	@echo "== aiokafka $(AIOKAFKA_MIN): reader, view and replay integration tests on Tansu"
	$(VENV_MIN)/bin/pytest -q -p no:cacheprovider $(MIN_TESTS)
	@if reason=$$($(VENV_MIN)/bin/python -m snapbus._kafka_broker 2>&1); then \
	  echo "== aiokafka $(AIOKAFKA_MIN): the same tests on Apache Kafka ($$reason)"; \
	  SNAPBUS_TEST_ENGINE=kafka $(VENV_MIN)/bin/pytest -q -p no:cacheprovider \
	    -m "integration or kafka" $(MIN_TESTS); \
	elif [ -n "$$CI" ]; then \
	  echo "error: the Kafka step of aiokafka $(AIOKAFKA_MIN) cannot run: $$reason" >&2; exit 1; \
	else \
	  echo "note: the Kafka step of aiokafka $(AIOKAFKA_MIN) did not run: $$reason"; \
	fi

## the Java and Rust pods of the wire-contract tests (tests/test_interop.py, docs/interop.md):
## Maven caches its jars in ~/.m2, cargo builds in $(SNAPBUS_INTEROP_RUST_TARGET), so a new
## clone reuses what an earlier run built (the tests build them too when missing or stale)
SNAPBUS_INTEROP_RUST_TARGET ?= $(HOME)/.cache/snapbus/interop-rust
export SNAPBUS_INTEROP_RUST_TARGET
CARGO ?= $(shell command -v cargo || echo $(HOME)/.cargo/bin/cargo)
JAVA_POD := interop/java/target/pod.jar
pods: $(JAVA_POD)
	@echo "== the Rust pod (cargo, $(SNAPBUS_INTEROP_RUST_TARGET))"
	cd interop/rust && CARGO_TARGET_DIR=$(SNAPBUS_INTEROP_RUST_TARGET) $(CARGO) build --quiet --locked

$(JAVA_POD): interop/java/pom.xml $(wildcard interop/java/src/main/java/dev/snapbus/interop/*.java) schemas/workspace_snapshot.avsc
	@echo "== the Java pod (Maven)"
	cd interop/java && mvn -q -B package -DskipTests

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check snapbus tests benchmarks
	$(BIN)/mypy --strict snapbus

## every benchmark on both embedded brokers (Tansu, then Apache Kafka), each ratio against its
## baseline on the same broker; writes benchmarks/RESULTS.md
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/run_all.py --scale --engine both

## the demo scenario many times (issue 21); a failed run writes a report to stress-reports/.
## STRESS_ARGS: e.g. "--runs 50 --engine kafka", "--partitions 1 --rate 0" (more writers per
## partition), "--fresh-broker --load 2"; see benchmarks/stress_demo.py
STRESS_ARGS ?= --runs 100 --duration 3
stress: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/stress_demo.py $(STRESS_ARGS)

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache .mypy_cache .ruff_cache .hypothesis
