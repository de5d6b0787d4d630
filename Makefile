# nbdplug: `make demo` runs the main job, `make test` passes the tests.
# Both set the machine up first (Debian packages, .venv).

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench clean

setup:
	@./tools/setup.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./tools/demo.sh

bench: setup
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache bench/results
