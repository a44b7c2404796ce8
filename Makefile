# Two commands for a fresh machine: `make demo` (main job on the embedded default) and `make test`.
# Both create or reuse .venv and install the tested set of packages (constraints.txt) once.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/defectlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

clean-outputs:
	rm -rf outputs/runs outputs/demo outputs/models
