"""The fuzzer's nbdplug side: a child process that runs nbdplug's verbs
in process, one JSON request a line on stdin, one JSON answer a line on
stdout, under an address-space limit.  The parent times each request and
replaces a worker that hangs or dies.

    {"argv": ["info", "-f", "qcow2", IMAGE]}
        -> {"rc": 0, "stdout": "...", "stderr": "...", "error": null}
    {"write": IMAGE, "format": "qcow2", "ops": [["pwrite", offset,
        length, byte], ["zero", offset, length], ["trim", ...]]}
        -> {"rc": 0 (written) | 2 (refused, "stderr" says why), ...}

"error" is the traceback of anything but an ImageError or UsageError
(what the CLI answers with a one-line message), or "MemoryError".
"""

import contextlib
import io
import json
import resource
import sys
import traceback


def _write(request):
    from nbdplug import open_image
    with open_image(request["write"], request["format"],
                    readonly=False) as disk:
        for op, offset, length, *rest in request["ops"]:
            offset, length = min(offset, disk.size), length
            length = min(length, disk.size - offset)
            if not length:
                continue
            if op == "pwrite":
                disk.pwrite(bytes([rest[0]]) * length, offset)
            elif op == "zero" and disk.can_zero:
                disk.zero(length, offset)
            elif op == "trim" and disk.can_trim:
                disk.trim(length, offset)
        disk.flush()
    return 0


def handle(request):
    from nbdplug import cli
    from nbdplug.errors import ImageError, UsageError
    out, err = io.StringIO(), io.StringIO()
    answer = {"rc": None, "error": None}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if "argv" in request:
                answer["rc"] = cli.main(request["argv"])
            else:
                try:
                    answer["rc"] = _write(request)
                except (ImageError, UsageError) as e:
                    print(f"nbdplug: {e}", file=sys.stderr)
                    answer["rc"] = 2
    except MemoryError:
        answer["error"] = "MemoryError"
    except BaseException:
        answer["error"] = traceback.format_exc()
    answer["stdout"] = out.getvalue()[-4000:]
    answer["stderr"] = err.getvalue()[-4000:]
    return answer


def main():
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel = sys.stdout
    for line in sys.stdin:
        answer = handle(json.loads(line))
        channel.write(json.dumps(answer) + "\n")
        channel.flush()


if __name__ == "__main__":
    main()
