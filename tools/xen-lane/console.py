"""console.py LOG PIDFILE: the Xen lane's serial console, from stdin.

Every line goes to LOG with the seconds since start; "CASE" lines, the
lane's progress ("XENLANE-T") and fatal errors are echoed.  On
"XENLANE-END" QEMU (its pid in PIDFILE) is stopped.  Then one line per
case and "xen-lane: N passed, N failed"; the exit status is 0 only when
cases ran and none failed.
"""

import os
import re
import signal
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def main(log_path, pidfile):
    start = time.monotonic()
    cases = []
    ended = False
    with open(log_path, "w") as log:
        for raw in sys.stdin.buffer:
            line = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n")
            line = line.replace("\r", "")
            stamped = f"[{time.monotonic() - start:7.2f}] {line}"
            log.write(stamped + "\n")
            log.flush()
            if line.startswith("CASE "):
                cases.append(line[5:])
                print(stamped, flush=True)
            elif line.startswith(("XENLANE-T", "XENLANE-FATAL", "  ",
                                  "HOST:")) or "Kernel panic" in line:
                print(stamped, flush=True)
            if line.startswith("XENLANE-END"):
                ended = True
                _stop(pidfile)
    passed = sum(1 for c in cases if c.split()[1:2] == ["PASS"])
    failed = len(cases) - passed
    if not ended:
        print("xen-lane: dom0 did not reach the end (hang, crash or "
              f"timeout); see {log_path}")
        failed += 1
    elif not cases:
        print("xen-lane: no case ran")
        failed += 1
    print()
    for c in cases:
        name, verdict = c.split()[:2]
        print(f"{verdict:4} {name}")
    print(f"xen-lane: {passed} passed, {failed} failed")
    return 1 if failed else 0


def _stop(pidfile):
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
