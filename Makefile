# The commands people type. Everything runs with the virtual environment's Python ($(VENV)), offline:
# tiny-shapes ships in the repository, tiny-sd15 is made on the spot, nothing is downloaded.
#
#   make setup       create $(VENV) and install the pinned dependencies (again only if requirements change)
#   make run         the browser app on http://127.0.0.1:7860 (HOST=0.0.0.0 PORT=... DATA=... BASE_MODEL=...)
#   make demo        offline CLI demo (~1.5 min): tiny-shapes learns an orange circle -> runs/demo/with-token.png, without-token.png
#   make demo-noise  the same flow on the random tiny-sd15 model (30 steps, the pictures are noise) -> runs/demo-noise/sample.png
#   make pretrain-shapes  build trainer_core/models/tiny-shapes (scripts/pretrain_tiny_shapes.py; see docs/TINY_SHAPES.md)
#   make test        the default test run (a few minutes on 2 CPU cores)
#   make test-slow   the long tests (pytest -m slow)
#   make bench       training speed benchmark (bench/train_speed.py; BENCH_ARGS=--quick for a smoke run)
#   make bench-switch adapter switch vs reload benchmark (bench/adapter_switch.py; BENCH_ARGS=--shape sd15)
#   make bench-gpu   real-size SD 1.5/SDXL speed and memory on CUDA (bench/gpu_train.py; BENCH_ARGS="--arch sd15")
#   make lint        ruff check + ruff format --check

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
DEMO ?= runs/demo
NOISE_DEMO ?= runs/demo-noise
BENCH_ARGS ?=
LINT_PATHS := trainer_core dreambooth_ui app.py tests bench examples scripts
HOST ?= 127.0.0.1
PORT ?= 7860
DATA ?= data
BASE_MODEL ?= tiny-shapes

# pytest exits 5 when it collected no tests; that is a failure here, but say so plainly.
define pytest_or_explain
	@rc=0; HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit 5), treated as a failure" >&2; fi; \
	exit $$rc
endef

.PHONY: help setup run demo demo-noise pretrain-shapes test test-slow bench bench-switch bench-gpu lint

help:
	@grep -E '^#   make ' Makefile | sed 's/^#   //'

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed; run make setup PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	@touch $@

# Every other target needs the environment; it is made by `make setup`, not silently here.
$(PY):
	@echo "error: no virtual environment at $(VENV); run 'make setup' first" >&2; exit 1

run: | $(PY)
	$(PY) app.py --host $(HOST) --port $(PORT) --data-dir $(DATA) --base-model $(BASE_MODEL)

# tiny-shapes knows circles of five colours; it learns one particular orange circle as "sks circle"
# and keeps drawing ordinary circles for "a photo of a circle" (prior preservation). The numbers are
# config.QUICK_TRY's, as in the app's Quick try (a test checks).
demo: | $(PY)
	rm -rf $(DEMO)
	$(PY) examples/make_subject_photos.py $(DEMO)/photos --count 5
	HF_HUB_OFFLINE=1 $(PY) -m trainer_core train --base-model tiny-shapes \
		--instance-dir $(DEMO)/photos --instance-prompt "a photo of sks circle" \
		--class-prompt "a photo of a circle" --num-class-images 16 --class-generation-steps 20 \
		--rank 8 --learning-rate 0.002 --max-train-steps 300 --train-batch-size 4 \
		--checkpointing-steps 100 --eval-models none --report-to none --output-dir $(DEMO)/run
	HF_HUB_OFFLINE=1 $(PY) examples/shapes_pictures.py $(DEMO)/run/adapter $(DEMO)
	@echo "demo done: adapter in $(DEMO)/run/adapter; $(DEMO)/with-token.png should show orange" \
		"circles, $(DEMO)/without-token.png circles of the world's colours"

# The whole flow on the random tiny-sd15 model: the mechanics (checkpoints, adapter, generate), noise.
demo-noise: | $(PY)
	rm -rf $(NOISE_DEMO)
	$(PY) examples/make_demo_photos.py $(NOISE_DEMO)/photos --count 5
	HF_HUB_OFFLINE=1 $(PY) -m trainer_core train --base-model tiny-sd15 \
		--instance-dir $(NOISE_DEMO)/photos --instance-prompt "a photo of sks toy" \
		--class-prompt "a photo of a toy" --num-class-images 8 \
		--max-train-steps 30 --checkpointing-steps 10 --output-dir $(NOISE_DEMO)/run
	HF_HUB_OFFLINE=1 $(PY) -m trainer_core generate --base-model tiny-sd15 --adapter $(NOISE_DEMO)/run/adapter \
		--prompt "a photo of sks toy" --seed 1 --out $(NOISE_DEMO)/sample.png
	HF_HUB_OFFLINE=1 $(PY) -m trainer_core generate --base-model tiny-sd15 \
		--prompt "a photo of sks toy" --seed 1 --out $(NOISE_DEMO)/sample-base.png
	@echo "demo-noise done: adapter in $(NOISE_DEMO)/run/adapter, images $(NOISE_DEMO)/sample.png (with it) and" \
		"$(NOISE_DEMO)/sample-base.png (without); tiny-sd15 is a random model, so both are noise"

# Two rounds of UNet training (4,000 then 3,000 steps, the second from the first's weights): about
# 50 minutes on 2 quiet CPU cores. The shipped weights were made by exactly these commands.
pretrain-shapes: | $(PY)
	HF_HUB_OFFLINE=1 $(PY) scripts/pretrain_tiny_shapes.py --out runs/pretrain-shapes-1 --threads 2
	HF_HUB_OFFLINE=1 $(PY) scripts/pretrain_tiny_shapes.py --out trainer_core/models/tiny-shapes --threads 2 \
		--vae-from runs/pretrain-shapes-1 --unet-from runs/pretrain-shapes-1 --unet-steps 3000 --evaluate

test: | $(PY)
	$(call pytest_or_explain,)

test-slow: | $(PY)
	$(call pytest_or_explain,-m slow)

bench: | $(PY)
	HF_HUB_OFFLINE=1 $(PY) bench/train_speed.py $(BENCH_ARGS)

bench-switch: | $(PY)
	HF_HUB_OFFLINE=1 $(PY) bench/adapter_switch.py $(BENCH_ARGS)

bench-gpu: | $(PY)
	HF_HUB_OFFLINE=1 $(PY) bench/gpu_train.py $(BENCH_ARGS)

lint: | $(PY)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
