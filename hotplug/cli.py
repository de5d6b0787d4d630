"""The `nbdplug` command with the dom0 verbs: attach, mount, umount,
list, detach.  nbdplug.cli owns the table and the error handling; this
adds verbs that need pyudev and pyparted, which nbdplug must not import.
They are imported by the verbs that use them, so `nbdplug info` starts
without them."""

import json
import sys

from nbdplug import cli

from . import VIA


def _print_attached(record):
    print(record["device"])
    for p in record["partitions"]:
        print(f"p{p['number']} {p['device']}")
    _say_why_not_fast(record)


def _say_why_not_fast(record):
    if record.get("fast_unavailable"):
        sys.stdout.flush()      # the device first, for scripts (2>&1)
        print(f"nbdplug: fast path unavailable: "
              f"{record['fast_unavailable']}; attached via {record['via']}",
              file=sys.stderr)


def cmd_attach(args):
    from . import attach as _attach
    record = _attach.attach(args.image, args.format, args.readonly,
                            args.force_share, args.via, cli.policy_from(args))
    _print_attached(record)


def cmd_mount(args):
    from . import mount as _mount
    record, dev = _mount.mount(args.image, args.mountpoint, args.format,
                               args.partition, args.readonly,
                               args.force_share, args.options, args.via,
                               cli.policy_from(args))
    print(f"{dev} mounted on {args.mountpoint}")
    _say_why_not_fast(record)


def cmd_restart(args):
    from . import attach as _attach
    for r in _attach.restart(args.target):
        print(f"restarted {r['device']} ({r['image']}): server pid "
              f"{r['server_pid']}, {r['nbd']}")


def cmd_map(args):
    if not args.dm:
        return cli.cmd_map(args)
    from dm import fast as dmfast
    from nbdplug.opener import open_image
    with open_image(args.image, args.format, readonly=True,
                    policy=cli.policy_from(args)) as disk:
        print(dmfast.would_load(disk).text(), end="")


def cmd_umount(args):
    from . import mount as _mount
    _mount.umount(args.mountpoint)


def cmd_list(args):
    from . import attach as _attach
    from . import state
    with state.locked():
        records = state.load_all()
    entries = []
    for r in records:
        e = {"image": r["image"], "format": r["format"],
             "readonly": r["readonly"], "via": r["via"],
             "device": r.get("device"),
             "partitions": {f"p{p['number']}": p.get("device")
                            for p in r.get("partitions", [])},
             "mounts": r.get("mounts", []),
             "server-pid": r.get("server_pid"),
             "alive": _attach.alive(r)}
        if r.get("fast_unavailable"):
            e["fast-unavailable"] = r["fast_unavailable"]
        if r["via"] == "fast":
            from . import fast
            e.update(nbd=r.get("nbd"), loops=r.get("loops", {}),
                     table=fast.status(r) if e["alive"] else None)
        entries.append(e)
    if args.output == "json":
        print(json.dumps(entries, indent=4))
        return
    for e in entries:
        parts = " ".join(f"{k}={v}" for k, v in e["partitions"].items())
        table = e.get("table")
        fast = (f" nbd={e['nbd']} targets={table['targets']} direct="
                f"{table['direct-bytes'] >> 20}MiB" if table else
                f" (fast path unavailable: {e['fast-unavailable']})"
                if "fast-unavailable" in e else "")
        dead = "DEAD (detach cleans it" + \
            ("; restart serves it again)" if e["via"] == "fast" else ")")
        print(f"{e['device'] or '-'} {e['image']} {e['format']} "
              f"{'ro' if e['readonly'] else 'rw'} via={e['via']}{fast} "
              f"pid={e['server-pid']} {'alive' if e['alive'] else dead}"
              + (f" {parts}" if parts else "")
              + "".join(f" mounted={m}" for m in e["mounts"]))


def cmd_detach(args):
    if args.all == bool(args.target):
        raise cli.UsageError("give DEV|IMAGE or --all")
    from . import attach as _attach
    for r in _attach.detach(args.target, everything=args.all):
        print(f"detached {r.get('device') or '-'} ({r['image']})")


def _args_attach_common(p):
    cli.add_format(p)
    p.add_argument("--readonly", "-r", action="store_true")
    p.add_argument("--force-share", "-U", action="store_true",
                   help="read an image another process holds (with -r)")
    p.add_argument("--via", choices=VIA,
                   help="fast: device-mapper sending what the image stores "
                   "plainly straight to its file, the rest to kernel NBD; "
                   "nbd: kernel NBD; loop: nbdfuse + loop (default: fast "
                   "where the kernel has NBD and device-mapper)")
    p.add_argument("--fast", dest="via", action="store_const",
                   const="fast", help="--via fast")
    cli.add_policy(p)
    p.add_argument("image")


def _args_attach(p):
    _args_attach_common(p)


def _args_mount(p):
    _args_attach_common(p)
    p.add_argument("mountpoint")
    p.add_argument("--partition", "-P", type=int, metavar="N")
    p.add_argument("-o", dest="options", metavar="OPTS",
                   help="extra mount options (nodev,nosuid always)")


def _args_restart(p):
    p.add_argument("target", metavar="DEV|IMAGE")


def _args_map(p):
    cli._args_info(p)
    p.add_argument("--dm", action="store_true",
                   help="print the device-mapper table attach --fast "
                   "would load (nbd for the NBD device, each host file "
                   "for its loop device)")


def _args_umount(p):
    p.add_argument("mountpoint")


def _args_list(p):
    p.add_argument("--output", choices=("human", "json"), default="human")


def _args_detach(p):
    p.add_argument("--all", action="store_true",
                   help="every attachment, mounted or not, live or dead")
    p.add_argument("target", nargs="?", metavar="DEV|IMAGE")


VERBS = [(name, cmd_map, _args_map,
          "map [-f FMT] [--output=human|json] [--dm] IMAGE")
         if name == "map" else (name, *rest)
         for name, *rest in cli.VERBS] + [
    ("attach", cmd_attach, _args_attach,
     "attach IMAGE [-f FMT] [--readonly] [--force-share] "
     "[--fast | --via fast|nbd|loop]"),
    ("mount", cmd_mount, _args_mount,
     "mount IMAGE DIR [-f FMT] [--partition N] [--readonly] [-o OPTS]"),
    ("umount", cmd_umount, _args_umount, "umount DIR"),
    ("list", cmd_list, _args_list, "list [--output=human|json]"),
    ("detach", cmd_detach, _args_detach, "detach DEV|IMAGE | --all"),
    ("restart", cmd_restart, _args_restart, "restart DEV|IMAGE"),
]


def main(argv=None):
    return cli.main(argv, VERBS)


if __name__ == "__main__":
    sys.exit(main())
