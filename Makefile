# nbdplug: `make demo` runs the main job, `make test` passes the tests.
# Both set the machine up first (Debian packages, .venv).

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-kernel test-xen install demo bench fuzz clean

setup:
	@./tools/setup.sh

# The host tests, a short seeded round of the differential fuzzer (no
# case may show a bad class; VHDX is left out while it reads a damaged
# first region table through the second, README "Hostile images"), then
# the kernel lane, then the Xen lane.
test: setup
	$(PY) -m pytest -q
	$(PY) tools/fuzz --seed 1 --cases 300 --formats qcow2,qcow,vmdk,vpc --strict
	./tools/kernel-lane.sh
	./tools/xen-lane.sh

# The tests marked kernel, inside Debian's stock kernel under QEMU.
test-kernel: setup
	./tools/kernel-lane.sh

# Real Xen 4.17 under QEMU: tapbridge, block-nbdplug, blkback and qdisk
# serving PV domUs (README.rst, "The Xen lane").
test-xen: setup
	./tools/xen-lane.sh

# The commands into /usr/local/bin (linked to the venv), udev rules that
# keep automounters and blkid away from our devices, the Xen hotplug
# scripts and the systemd unit of `nbdplug serve`.
install: setup
	ln -sf $(CURDIR)/$(VENV)/bin/nbdplug $(CURDIR)/$(VENV)/bin/tapbridge /usr/local/bin/
	install -m 644 hotplug/rules/*.rules /etc/udev/rules.d/
	-udevadm control --reload
	install -d /etc/xen/scripts /etc/nbdplug
	install -m 755 hotplug/xen/block-nbdplug hotplug/xen/block-tapbridge /etc/xen/scripts/
	install -m 644 hotplug/xen/nbdplug-common.sh /etc/xen/scripts/
	install -m 644 hotplug/nbdplug@.service /etc/systemd/system/
	-systemctl daemon-reload

demo: setup
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./tools/demo.sh

bench: setup
	$(PY) bench/bench.py

# The differential fuzzer against qemu-img for FUZZ_SECONDS (or
# FUZZ_CASES cases) of every format, keeping each case with a bad class
# under tests/fuzz_cases (replayed by tests/test_900_fuzz_cases.py).
FUZZ_SECONDS ?= 600
FUZZ_SEED ?= $(shell date +%s)
fuzz: setup
	$(PY) tools/fuzz --save --jobs 2 --seed $(FUZZ_SEED) \
		$(if $(FUZZ_CASES),--cases $(FUZZ_CASES),--seconds $(FUZZ_SECONDS))

clean:
	rm -rf $(VENV) .pytest_cache bench/results
