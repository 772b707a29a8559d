# mnist-ray: the two quick-start commands are `make quickstart` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: install quickstart test lock clean

install: $(VENV)/.installed

# Reinstall when the dependencies change; the lock pins every package that was tested.
# The package itself with -qq: setuptools' notes on how an editable install works are not output.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install -qq --no-deps -e .
	touch $@

# The main job end to end on data that needs no network: shards of 5,000 real MNIST digits ->
# a quick training run (smoke preset, the default worker layout) -> batch inference on the 10,000 MNIST test digits
# shipped in the package -> report (the accuracy is on digits training never saw). Run it again and
# every stage is skipped; delete a stage's output and that stage and the ones after it rerun.
# Quiet: one line per stage and progress; everything else is in $(OUT)/quickstart/_logs/.
quickstart: install
	$(BIN)/mnist-ray pipeline --preset smoke --output $(OUT)/quickstart

# The whole test suite on a real local Ray and a real S3 server on 127.0.0.1.
test: install
	$(BIN)/python -m pytest

# Rewrite the lock after changing dependencies: a resolve of pyproject.toml that keeps every
# tested pin that still fits (pip's unconstrained backtracking wanders to old s3fs releases).
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet -c requirements.lock -e '.[test]'
	{ head -n 2 requirements.lock; $(VENV)-lock/bin/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
