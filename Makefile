# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv here and
# install what they need. On a machine without a torch in .venv we install the CPU build
# (TORCH_SPEC); GPU users install their own CUDA build into .venv first and it is kept.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test install bench clean demo-model screenshots

# One stamp per set of extras, rebuilt when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$*]"
	touch $@

install: $(VENV)/.installed-models

demo: $(VENV)/.installed-models
	$(VENV)/bin/framepack demo

# Debian's chromium for the browser tests (tests/test_ui_browser.py). Playwright drives this one,
# so nothing is downloaded when the tests run. Without root or apt-get those tests are skipped.
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else echo "warning: cannot install Debian's chromium here (needs root and apt-get); browser tests will skip" >&2; fi

# Names that do not exist and syntax errors fail before the (long) tests: ruff's pyflakes rules F82x,
# F63x and F7xx (the whole style set is not enforced).
# The suite runs on every core (pytest-xdist, one torch thread per worker: tests/conftest.py), each test
# file on one worker (its module-scoped models and servers are made once); PYTEST_XDIST= runs it serially.
PYTEST_XDIST ?= -n auto --dist loadfile
test: $(VENV)/.installed-dev $(CHROMIUM)
	$(VENV)/bin/ruff check --quiet --select F82,F63,F7 src tests benchmarks
	$(PY) -m pytest -q $(PYTEST_XDIST)

# Retake the README's screenshots of the web app: the browser tests' generation, with the demo model.
screenshots: $(VENV)/.installed-dev $(CHROMIUM)
	FRAMEPACK_UI_TEST_MODEL=tiny FRAMEPACK_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q tests/test_ui_browser.py \
	  -k "one_second or bad_input or history"

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/transformer_forward.py

# Retrain the embedded demo models from scratch (hours on a CPU; every stage resumes from its latest
# checkpoint, so it can be interrupted and started again), evaluate it and package it.
GEN2_VAE_RUNS = runs/demo-vae runs/gen2-vae runs/gen2-vae-smooth
GEN2_TRANSFORMER_RUNS = runs/gen2-framepack runs/gen2-framepack-long runs/gen2-framepack-det
demo-model: $(VENV)/.installed-train
	for stage in gen2_vae gen2_vae_smooth gen2_framepack gen2_framepack_long; do \
	  $(VENV)/bin/framepack train configs/$$stage.json || exit 1; done
	$(PY) -m framepack.train.package --out runs/gen2-model --cfg 3 --half --forward-up-to 5 --max-inverted-padding 3
	$(VENV)/bin/framepack eval --model runs/gen2-model --start independent --split test --json runs/gen2-eval-test.json \
	  > runs/gen2-eval-test.md
	$(PY) -m framepack.train.package --cfg 3 --half --forward-up-to 5 --max-inverted-padding 3 --vae-runs $(GEN2_VAE_RUNS) \
	  --notes configs/gen2_card_notes.md --eval-table runs/gen2-eval-test.md
	$(VENV)/bin/framepack calibrate-cache --model tiny
	$(PY) benchmarks/caching.py --write-default
	# the few-step student that `framepack demo` runs (tiny-fast), held to its teacher on the test split
	$(VENV)/bin/framepack train configs/gen2_student3.json
	$(PY) -m framepack.train.distill_task configs/gen2_student3.json --package src/framepack/assets/tiny-fast \
	  --half --share-encoders src/framepack/assets/tiny --card configs/gen2_student_card.md --forward-up-to 10 --max-inverted-padding none
	$(VENV)/bin/framepack eval --model tiny-fast --start independent --split test --json runs/gen2-student-eval-test.json
	$(PY) benchmarks/student.py --teacher runs/gen2-eval-test.json --student runs/gen2-student-eval-test.json \
	  > runs/gen2-student-vs-teacher-test.md
	$(PY) benchmarks/evaluation.py --model-json runs/gen2-student-eval-test.json --card-table runs/gen2-student-eval-test.md
	cp configs/gen2_student_card.md src/framepack/assets/tiny-fast/MODEL_CARD.md
	# the teacher fine-tuned on the determined world (2026-12-06): from the teacher packaged above, shipped in it
	# (its manifest kept; the MagCache ratios, the old transformer's, measured again and the cache gated again)
	# and measured on the determined world's test split, the default since
	$(VENV)/bin/framepack train configs/gen2_framepack_determined.json
	$(PY) -m framepack.train.package --out src/framepack/assets/tiny --transformer runs/gen2-framepack-det --transformer-only \
	  --half --vae-runs $(GEN2_VAE_RUNS) --transformer-runs $(GEN2_TRANSFORMER_RUNS)
	$(VENV)/bin/framepack calibrate-cache --model tiny
	$(PY) benchmarks/caching.py --write-default
	$(VENV)/bin/framepack eval --model tiny --split test --json runs/gen2-det-eval-test.json
	$(PY) benchmarks/evaluation.py --model-json runs/gen2-det-eval-test.json --card-table runs/gen2-det-eval-test.md
	$(PY) -m framepack.train.package --out src/framepack/assets/tiny --card-only --eval-table runs/gen2-det-eval-test.md \
	  --vae-runs $(GEN2_VAE_RUNS) --transformer-runs $(GEN2_TRANSFORMER_RUNS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
