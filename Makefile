# The two quick-start commands: `make demo` (the main job) and `make test` (mypy, then the tests).
# Both create .venv on first use (pip, Python 3.10+) and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[unlearn,bench,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m bench study --quick --out out/demo

test: $(STAMP)
	$(VENV)/bin/python -m mypy gradstore unlearn
	$(VENV)/bin/python -m pytest tests
