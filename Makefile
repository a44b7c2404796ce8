# Two commands for a fresh machine: `make demo` (main job on the embedded default) and `make test`.
# Both create or reuse .venv and install the tested set of packages (constraints.txt) once.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lab explore clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/defectlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder --durations=15

lab: $(STAMP)  # JupyterLab on the notebooks: the paired .py files open as notebooks (jupytext)
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 notebooks

explore: $(STAMP)  # the newest run's explorer as a web page (Voila) on 127.0.0.1
	$(BIN)/defectlab explore --run latest

clean-outputs:
	rm -rf outputs/runs outputs/demo outputs/models
