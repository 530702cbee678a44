# Two commands on a fresh machine:
#   make demo   set up .venv, make the synthetic data, train and evaluate
#   make test   set up .venv and run the tests
# After the demo, `make lora-demo` fine-tunes its model with LoRA on shapes in
# colours it never saw (configs/demo_lora.py).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/demo
RUN := runs/demo
HELD_OUT := data/held-out
# This machine's pip configuration names local mirrors that may be absent; its
# warnings about them are noise.
QUIET_PIP := sed "/is ignored: it is neither a file nor a directory/d"

.PHONY: demo lora-demo test clean

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import trainer.cli, pipeline.prepare"
	touch $@

$(DATA)/coco/annotations/captions_val.json: $(STAMP) pipeline/synthetic.py
	$(BIN)/python -m pipeline.synthetic $(DATA)/coco

$(DATA)/prepared/%/manifest.json: $(DATA)/coco/annotations/captions_val.json
	$(BIN)/capjax prepare $(DATA)/coco/annotations/captions_$*.json \
	  --images $(DATA)/coco/$* --out $(DATA)/prepared/$*

demo: $(DATA)/prepared/train/manifest.json $(DATA)/prepared/val/manifest.json
	$(BIN)/capjax train --config configs/demo.py --workdir $(RUN)
	$(BIN)/capjax eval --checkpoint $(RUN)

$(HELD_OUT)/coco/annotations/captions_val.json: $(STAMP) pipeline/synthetic.py
	$(BIN)/python -m pipeline.synthetic $(HELD_OUT)/coco --palette held-out \
	  --train 2000 --val 500 --seed 1

$(HELD_OUT)/prepared/%/manifest.json: $(HELD_OUT)/coco/annotations/captions_val.json
	$(BIN)/capjax prepare $(HELD_OUT)/coco/annotations/captions_$*.json \
	  --images $(HELD_OUT)/coco/$* --out $(HELD_OUT)/prepared/$*

lora-demo: $(HELD_OUT)/prepared/train/manifest.json $(HELD_OUT)/prepared/val/manifest.json
	test -d $(RUN)/checkpoints || $(MAKE) demo
	$(BIN)/capjax train --config configs/demo_lora.py --workdir runs/demo_lora
	$(BIN)/capjax eval --checkpoint runs/demo_lora

# The tests run on TEST_WORKERS processes (tests sharing a module's runs stay
# on one), then those marked serial alone.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not serial" tests
	$(BIN)/pytest -q -m serial tests

clean:
	rm -rf $(VENV) data runs bench/.seed-venv
