"""Differential fuzzer: mutated images through nbdplug and qemu-img.

    tools/fuzz [--cases N | --seconds S] [--seed N] [--formats qcow2,vmdk]
               [--jobs N] [--save] [--strict] [--json FILE]

Seeds of every format (seeds.py) are mutated (mutate.py) and each case
is judged (run.py) against qemu-img.  Cases are numbered: case i of seed
N is the same image on any run, so a failure is reproduced with
`--seed N --first i --cases 1`.  --save keeps every case with a bad
class as a regression case under tests/fuzz_cases (compressed), which
tests/test_900_fuzz_cases.py replays.  --strict exits 1 when any case
shows a bad class.  The summary gives the count of each class, the check
disagreements, and of the images qemu reads and checks clean the share
nbdplug reads with identical bytes, with the reasons for the rest.
"""

import argparse
import collections
import concurrent.futures
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cases  # noqa: E402
import mutate  # noqa: E402
import run  # noqa: E402
import seeds  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/fuzz")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cases", type=int, default=None)
    p.add_argument("--first", type=int, default=0,
                   help="number of the first case (to reproduce one)")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--formats", default="",
                   help="formats or seed names, comma separated")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--save", action="store_true",
                   help="keep bad cases under tests/fuzz_cases")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any case shows a bad class")
    p.add_argument("--no-write", action="store_true",
                   help="skip writing to copies (faster)")
    p.add_argument("--keep", metavar="DIR",
                   help="copy every case with a class into DIR")
    p.add_argument("--json", metavar="FILE", help="write the summary here")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every case with a class")
    args = p.parse_args(argv)
    if args.cases is None and args.seconds is None:
        args.cases = 100
    return args


def reason(text):
    """A refusal message with paths and numbers taken out, to group by."""
    text = re.sub(r"^nbdplug: \S+ \(\w+\): ", "", text)
    text = re.sub(r"0x[0-9a-f]+|\d+", "N", text)
    return text[:120]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.cases = 0
        self.classes = collections.Counter()
        self.examples = {}
        self.clean = 0              # qemu reads and checks clean
        self.clean_read = 0         # ... and we read the same bytes
        self.not_read = collections.Counter()   # reasons for the rest
        self.checked = collections.Counter()    # format -> cases checked
        self.disagree = collections.Counter()   # format -> disagreements

    def add(self, fmt, number, mutation, verdict):
        with self.lock:
            self.cases += 1
            for name, seen in verdict.classes.items():
                self.classes[name] += 1
                self.examples.setdefault(name, (number, fmt, mutation,
                                                seen))
            q, o = verdict.facts["qemu"], verdict.facts["nbdplug"]
            if q["reads"] and q["check"] in (0, 3, 63):
                self.clean += 1
                if o["reads"] and "bytes differ" not in verdict.classes:
                    self.clean_read += 1
                else:
                    self.not_read[reason(o["error"]) if not o["reads"]
                                  else "bytes differ"] += 1
            if fmt in run.CHECKED:
                self.checked[fmt] += 1
                if "check disagrees" in verdict.classes:
                    self.disagree[fmt] += 1

    def summary(self):
        bad = {k: self.classes[k] for k in run.BAD}
        share = 100.0 * self.clean_read / self.clean if self.clean else 100.0
        return {
            "cases": self.cases,
            "classes": dict(self.classes),
            "bad": bad,
            "examples": {k: list(v) for k, v in self.examples.items()},
            "check": {fmt: {"cases": n, "disagree": self.disagree[fmt]}
                      for fmt, n in self.checked.items()},
            "qemu reads clean": self.clean,
            "nbdplug reads identically": self.clean_read,
            "share": round(share, 2),
            "not read": dict(self.not_read.most_common()),
        }


def case_image(seed_list, seed, number, work):
    """Case `number` of `seed`: (seed name, format, path, mutation)."""
    rng = random.Random(f"{seed}:{number}")
    name, fmt, path = rng.choice(seed_list)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    mutation = mutate.mutate(rng, data, SHAPES[name])
    out = os.path.join(work, f"case.{fmt}")
    with open(out, "wb") as f:
        f.write(data)
    return name, fmt, out, mutation


SHAPES = {}


def main(argv=None):
    args = parse_args(argv)
    top = tempfile.mkdtemp(prefix="nbdplug-fuzz.",
                           dir=os.environ.get("FUZZ_TMP"))
    try:
        wanted = [w for w in args.formats.split(",") if w]
        seed_list = seeds.build_seeds(os.path.join(top, "seeds"), wanted)
        for name, fmt, path in seed_list:
            with open(path, "rb") as f:
                SHAPES[name] = mutate.SHAPES[fmt](f.read())
        allowed = (run.deliberate_refusals(), run.deliberate_leniencies())
        tally = Tally()
        deadline = time.monotonic() + args.seconds if args.seconds else None
        numbers = iter(range(args.first, args.first + args.cases)
                       if args.cases is not None else
                       __import__("itertools").count(args.first))
        numbers_lock = threading.Lock()

        def lane(k):
            work = os.path.join(top, f"lane{k}")
            os.makedirs(work)
            worker = run.Worker()
            try:
                while deadline is None or time.monotonic() < deadline:
                    with numbers_lock:
                        number = next(numbers, None)
                    if number is None:
                        return
                    name, fmt, image, mutation = case_image(
                        seed_list, args.seed, number, work)
                    verdict = run.judge(image, fmt, work, worker,
                                        write=not args.no_write,
                                        allowed=allowed)
                    tally.add(fmt, number, mutation, verdict)
                    if verdict.bad and args.save:
                        cases.save(image, fmt, name, args.seed, number,
                                   mutation, verdict)
                    if args.keep and verdict.classes:
                        os.makedirs(args.keep, exist_ok=True)
                        shutil.copyfile(image, os.path.join(
                            args.keep, f"case-{number}.{fmt}"))
                    if args.verbose and verdict.classes:
                        print(f"case {number} {name}: {mutation}: "
                              f"{verdict.classes}", flush=True)
            finally:
                worker.close()

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(lane, k) for k in range(args.jobs)]:
                future.result()
        summary = tally.summary()
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.strict and any(summary["bad"].values()):
        return 1
    return 0


def print_summary(s):
    print(f"{s['cases']} cases")
    for name, count in sorted(s["classes"].items(), key=lambda kv: -kv[1]):
        mark = "BAD " if name in run.BAD else "    "
        print(f"  {mark}{name}: {count}")
        if name in run.BAD and name in s["examples"]:
            number, fmt, mutation, seen = s["examples"][name]
            print(f"        e.g. case {number} ({fmt}: {mutation}): {seen}")
    for fmt, c in s["check"].items():
        print(f"  check disagreements on {fmt}: {c['disagree']} of "
              f"{c['cases']}")
    print(f"  qemu-img reads and checks clean: {s['qemu reads clean']}; "
          f"nbdplug reads {s['nbdplug reads identically']} with identical "
          f"bytes ({s['share']}%)")
    for why, count in list(s["not read"].items())[:20]:
        print(f"      {count:5}  {why}")


if __name__ == "__main__":
    sys.exit(main())
