# Two commands on a fresh machine:
#   make demo   set up .venv, make the synthetic data, train and evaluate
#   make test   set up .venv and run the tests
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/demo
RUN := runs/demo
# This machine's pip configuration names local mirrors that may be absent; its
# warnings about them are noise.
QUIET_PIP := sed "/is ignored: it is neither a file nor a directory/d"

.PHONY: demo test clean

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

test: $(STAMP)
	$(BIN)/pytest -q tests

clean:
	rm -rf $(VENV) data runs bench/.seed-venv
