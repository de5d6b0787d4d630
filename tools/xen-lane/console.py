"""console.py LOG PIDFILE: the Xen lane's serial console, from stdin.

Every line goes to LOG with the seconds since start; "CASE" lines, the
lane's progress ("XENLANE-T") and fatal errors are echoed.  On
"XENLANE-END" QEMU (its pid in PIDFILE) is stopped.  Then the throughput
table from the "BENCH" lines, one line per case and "xen-lane: N
passed, N failed"; the exit status is 0 only when cases ran and none
failed.
"""

import os
import re
import signal
import statistics
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def main(log_path, pidfile):
    start = time.monotonic()
    cases = []
    bench = {}
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
            elif line.startswith("BENCH "):
                _bench(line, bench)
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
    if bench:
        print(_table(bench))
        print()
    for c in cases:
        name, verdict = c.split()[:2]
        print(f"{verdict:4} {name}")
    print(f"xen-lane: {passed} passed, {failed} failed")
    return 1 if failed else 0


# "BENCH tapbridge persistent=1 BENCH read 1048576 1 ops N secs S iops I
# mibs M", as dom0 passes on the domU's xtool bench lines.
BENCH = re.compile(r"BENCH (\S+) persistent=(\d) BENCH (\S+) (\d+) (\d+) "
                   r"ops \d+ secs \S+ iops (\S+) mibs (\S+)")
BACKENDS = ("tapbridge", "qdisk", "blkback")


def _bench(line, bench):
    m = BENCH.match(line)
    if m:
        backend, persistent, mode, bs, qd, iops, mibs = m.groups()
        row = (mode, int(bs), int(qd))
        value = float(mibs) if int(bs) >= 1 << 20 else float(iops)
        bench.setdefault(row, {}).setdefault((backend, persistent),
                                             []).append(value)


def _table(bench):
    """One row per test, one column per backend and persistent grants
    on (p) or off (c, copy), each the median of its runs; the last column
    tapbridge / qdisk, persistent grants on / off."""
    bench = {row: {k: statistics.median(v) for k, v in values.items()}
             for row, values in bench.items()}
    cols = [(b, p) for b in BACKENDS for p in ("1", "0")]
    head = ["test"] + [f"{b} {'p' if p == '1' else 'c'}" for b, p in cols] \
        + ["tb/qdisk"]
    rows = [head]
    for (mode, bs, qd), values in sorted(bench.items(),
                                         key=lambda kv: (-kv[0][1], kv[0])):
        unit = "MiB/s" if bs >= 1 << 20 else "IOPS"
        size = f"{bs >> 20}M" if bs >= 1 << 20 else f"{bs >> 10}K"
        row = [f"{mode} {size} QD{qd} {unit}"]
        row += [f"{values[c]:.0f}" if c in values else "-" for c in cols]
        ratios = [values[("tapbridge", p)] / values[("qdisk", p)]
                  for p in ("1", "0")
                  if values.get(("qdisk", p)) and ("tapbridge", p) in values]
        row.append("/".join(f"{r:.2f}" for r in ratios) or "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _stop(pidfile):
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
