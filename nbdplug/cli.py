"""The `nbdplug` command.

One verb table (like qemu-img-cmds.hx) builds the argument parser.  Letters
follow qemu-img: -f format, -O output format, -o options, -b/-F backing
file and format, --output=human|json.  A user error prints one line on
stderr and exits 2; nothing prints a traceback at a person.
"""

import argparse
import json
import re
import sys

from .errors import ImageError, UnsupportedFeature, UsageError
from .formats import FORMATS
from .opener import open_image
from .ops import info
from .options import parse_size, split_options
from .policy import OpenPolicy
from .report import EXIT_UNSUPPORTED

PROG = "nbdplug"

def policy_from(args):
    """The open policy the --backing-root and --no-backing flags ask for."""
    return OpenPolicy(roots=getattr(args, "backing_root", None) or (),
                      no_backing=getattr(args, "no_backing", False))


def add_policy(p):
    p.add_argument("--backing-root", action="append", metavar="DIR",
                   help="also allow backing/extent files under DIR")
    p.add_argument("--no-backing", action="store_true",
                   help="refuse every backing/extent file")


def add_format(p, letter="-f"):
    p.add_argument(letter, dest="format", choices=sorted(FORMATS),
                   metavar="FMT", help="image format (" +
                   ", ".join(sorted(FORMATS)) + ")")


# --- info / map -------------------------------------------------------

def cmd_info(args):
    with open_image(args.image, args.format, readonly=True,
                    policy=policy_from(args)) as disk:
        facts = info.image_info(disk)
    if args.output == "json":
        print(json.dumps(facts, indent=4))
    else:
        print("\n".join(info.info_lines(facts)))


def cmd_map(args):
    with open_image(args.image, args.format, readonly=True,
                    policy=policy_from(args)) as disk:
        entries = info.map_entries(disk)
        chain = [d.path for d in disk.chain()]
    if args.output == "json":
        print(json.dumps(entries))
    else:
        print("\n".join(info.map_lines(entries, chain)))


# --- create -----------------------------------------------------------

def cmd_create(args):
    from .ops.create import create_image
    size = parse_size(args.size) if args.size is not None else None
    create_image(args.image, args.format, size, split_options(args.options),
                 backing=args.backing, backing_fmt=args.backing_format,
                 policy=policy_from(args))
    if not args.quiet:
        print(f"Formatting '{args.image}', fmt={args.format}"
              + (f" size={size}" if size is not None else ""))


# --- check ------------------------------------------------------------

def cmd_check(args):
    from .ops.check import check_image
    try:
        report = check_image(args.image, args.format, repair=args.repair,
                             policy=policy_from(args))
    except UnsupportedFeature as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=4))
    else:
        print(report.human())
    return report.exit_code()


# --- serve / stop -----------------------------------------------------

def cmd_serve(args):
    from .serve import exports, nbdkit
    cfg = (exports.load(args.config, FORMATS) if args.config
           else exports.ServeConfig())
    for key in ("listen", "socket", "tls_psk", "tls_certs"):
        if getattr(args, key):
            setattr(cfg, key, getattr(args, key))
    cfg.tls_verify_peer |= args.tls_verify_peer
    cfg.insecure |= args.insecure
    cfg.allow += [a for item in args.allow or () for a in item.split(",")
                  if a]
    if args.image:
        cfg.exports.insert(0, exports.Export("", args.image, args.format))
    cfg.exports += [exports.parse_export(text, FORMATS, args.format)
                    for text in args.export or ()]
    for export in cfg.exports:
        export.limit = export.limit or args.limit
    if args.readonly and args.writable:
        raise UsageError("give --readonly or --writable, not both")
    writable = True if args.writable else False if args.readonly else None
    return nbdkit.serve(cfg, writable, policy=policy_from(args),
                        direct=args.direct, foreground=args.foreground,
                        pidfile=args.pidfile)


def cmd_stop(args):
    from .serve import nbdkit
    target = args.target
    if target.startswith(("nbd+unix:", "nbds+unix:")):
        target = target.split("socket=", 1)[-1]
        from urllib.parse import unquote
        target = unquote(target)
    pidfile = target if target.endswith(".pid") else target + ".pid"
    pid = nbdkit.stop(pidfile)
    print(f"stopped server pid {pid}")


# --- convert ----------------------------------------------------------

def cmd_convert(args):
    from .ops.convert import convert  # keeps tqdm off every other verb
    convert(args.src, args.dst, args.out_format, src_fmt=args.format,
            options=split_options(args.options), compress=args.compress,
            backing=args.backing, backing_fmt=args.backing_format,
            share=args.force_share, policy=policy_from(args),
            progress=args.progress or (sys.stderr.isatty() and
                                       not args.quiet))


def _args_convert(p):
    add_format(p)
    p.add_argument("-O", dest="out_format", required=True,
                   choices=sorted(FORMATS), metavar="FMT",
                   help="output format")
    p.add_argument("-o", dest="options", metavar="OPTS",
                   help="output format options KEY=VALUE[,...]")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the output (formats that can)")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress bar even when not on a terminal")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read a source another process may be writing")
    p.add_argument("-B", dest="backing", metavar="BACKING",
                   help="backing file of the output; what the source's "
                   "top layer does not hold is left to it")
    p.add_argument("-F", dest="backing_format", choices=sorted(FORMATS),
                   metavar="FMT")
    add_policy(p)
    p.add_argument("src")
    p.add_argument("dst")


# --- compare ------------------------------------------------------------

def cmd_compare(args):
    from .ops.compare import compare
    outcome = compare(args.image1, args.image2, args.format,
                      args.format2, strict=args.strict,
                      share=args.force_share, policy=policy_from(args))
    if not args.quiet:
        print("\n".join(outcome.messages))
    return 0 if outcome.identical else 1


def _args_compare(p):
    add_format(p)
    p.add_argument("-F", dest="format2", choices=sorted(FORMATS),
                   metavar="FMT", help="format of the second image")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="sizes and allocation must match too")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read images another process may be writing")
    add_policy(p)
    p.add_argument("image1")
    p.add_argument("image2")


# --- rebase -------------------------------------------------------------

def cmd_rebase(args):
    from .ops.rebase import rebase_image
    rebase_image(args.image, args.format, args.backing, args.backing_format,
                 unsafe=args.unsafe, policy=policy_from(args))


def _args_rebase(p):
    add_format(p)
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="only rewrite the reference (no data is copied)")
    p.add_argument("-b", dest="backing", required=True, metavar="BACKING",
                   help='new backing file ("" for none: flatten)')
    p.add_argument("-F", dest="backing_format", choices=sorted(FORMATS),
                   metavar="FMT")
    add_policy(p)
    p.add_argument("image")


# --- resize -------------------------------------------------------------

def cmd_resize(args):
    from .ops.resize import resize_image
    text = args.size.strip()
    relative = text[:1] in ("+", "-")
    size = parse_size(text[1:] if relative else text)
    resize_image(args.image, -size if text[:1] == "-" else size,
                 args.format, shrink=args.shrink, relative=relative,
                 policy=policy_from(args))
    if not args.quiet:
        print("Image resized.")


def _args_resize(p):
    # "-1G" is a size, not an option (qemu-img takes it so too).
    p._negative_number_matcher = re.compile(r"^-\d")
    add_format(p)
    p.add_argument("--shrink", action="store_true",
                   help="allow the image to become smaller")
    p.add_argument("-q", dest="quiet", action="store_true")
    add_policy(p)
    p.add_argument("image")
    p.add_argument("size", help="[+|-]SIZE")


# --- rm-ram -------------------------------------------------------------

def cmd_rm_ram(args):
    from .formats.ram import remove
    remove(args.name)


# --- migrate ------------------------------------------------------------

def cmd_migrate(args):
    from .ops import migrate
    rate = parse_size(args.rate) if getattr(args, "rate", None) else None
    if args.action == "start":
        return migrate.start(args.source, args.image, rate or 0,
                             args.progress, not args.no_wait,
                             split_options(args.options))
    if args.action == "resume":
        return migrate.resume(args.image, rate, args.progress,
                              not args.no_wait)
    if args.action == "cancel":
        return migrate.cancel(args.image)
    st = migrate.status(args.image)
    print(migrate.to_json(st) if args.output == "json"
          else "\n".join(migrate.status_lines(st)))


def _args_migrate(p):
    actions = p.add_subparsers(dest="action", metavar="ACTION",
                               parser_class=_Parser, required=True)
    for name in ("start", "resume"):
        a = actions.add_parser(name, help="move the disk here" if name ==
                               "start" else "go on after a stop or cancel")
        a.add_argument("--rate", metavar="BYTES/s",
                       help="fill at most this fast (suffixes K, M, G)")
        a.add_argument("-p", dest="progress", action="store_true",
                       help="show a progress bar")
        a.add_argument("--no-wait", action="store_true",
                       help="return at once; the process that opens the "
                       "image writable (serve, attach, tapbridge) fills it")
        if name == "start":
            a.add_argument("-o", dest="options", metavar="OPTS",
                           help="qcow2 options KEY=VALUE[,...]")
            a.add_argument("source", help="NBD URI or local image")
        a.add_argument("image", help="the local qcow2 image")
    a = actions.add_parser("status", help="how far the move is")
    a.add_argument("--output", choices=("human", "json"), default="human")
    a.add_argument("image")
    a = actions.add_parser("cancel", help="stop filling; the image stays "
                           "backed by the source")
    a.add_argument("image")


# --- verb table ---------------------------------------------------------

def _args_info(p):
    add_format(p)
    p.add_argument("--output", choices=("human", "json"), default="human")
    add_policy(p)
    p.add_argument("image")


def _args_create(p):
    add_format(p)
    p.add_argument("-o", dest="options", metavar="OPTS",
                   help="format options KEY=VALUE[,...]")
    p.add_argument("-b", dest="backing", metavar="BACKING")
    p.add_argument("-F", dest="backing_format", choices=sorted(FORMATS),
                   metavar="FMT")
    p.add_argument("-q", dest="quiet", action="store_true")
    add_policy(p)
    p.add_argument("image")
    p.add_argument("size", nargs="?")


def _args_check(p):
    add_format(p)
    p.add_argument("-r", dest="repair", choices=("leaks", "all"),
                   help="repair leaks, or leaks and corruptions")
    p.add_argument("--output", choices=("human", "json"), default="human")
    add_policy(p)
    p.add_argument("image")


def _args_serve(p):
    add_format(p)
    p.add_argument("--export", action="append", metavar="NAME=IMAGE[:FMT]",
                   help="serve IMAGE as export NAME (repeatable)")
    p.add_argument("--config", metavar="FILE",
                   help="exports and server settings (see README)")
    p.add_argument("--socket", metavar="PATH")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="TCP address ([ADDR]:PORT for IPv6)")
    p.add_argument("--readonly", "-r", action="store_true")
    p.add_argument("--writable", action="store_true",
                   help="let TCP clients write (read-only by default)")
    p.add_argument("--tls-psk", metavar="FILE",
                   help="require TLS with these pre-shared keys (psktool)")
    p.add_argument("--tls-certs", metavar="DIR",
                   help="require TLS with the X.509 files in DIR")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="admit only clients with a certificate from the CA")
    p.add_argument("--allow", action="append", metavar="ADDR[,ADDR]",
                   help="admit only these client addresses or networks")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="at most N connections to each export")
    p.add_argument("--direct", action="store_true",
                   help="O_DIRECT on the image file (raw)")
    p.add_argument("--insecure", action="store_true",
                   help="allow clear-text TCP beyond loopback")
    p.add_argument("--foreground", action="store_true")
    p.add_argument("--pidfile", metavar="PATH")
    add_policy(p)
    p.add_argument("image", nargs="?")


def _args_stop(p):
    p.add_argument("target", help="socket path, nbd+unix URI or pidfile")


def _args_rm_ram(p):
    p.add_argument("name", help="RAM disk NAME (or ram:NAME); servers "
                   "that have it open keep it until they close it")


VERBS = [
    ("info", cmd_info, _args_info,
     "info [-f FMT] [--output=human|json] IMAGE"),
    ("map", cmd_map, _args_info,
     "map [-f FMT] [--output=human|json] IMAGE"),
    ("create", cmd_create, _args_create,
     "create -f FMT [-o OPTS] [-b BACKING [-F FMT]] IMAGE [SIZE]"),
    ("check", cmd_check, _args_check,
     "check [-f FMT] [-r leaks|all] [--output=human|json] IMAGE"),
    ("serve", cmd_serve, _args_serve,
     "serve [IMAGE] [-f FMT] [--export NAME=IMAGE[:FMT]]... "
     "[--config FILE] [--socket PATH | --listen HOST:PORT] "
     "[--readonly | --writable] [--tls-psk FILE | --tls-certs DIR "
     "[--tls-verify-peer]] [--allow ADDR,...] [--limit N] [--foreground]"),
    ("stop", cmd_stop, _args_stop, "stop SOCKET|URI|PIDFILE"),
    ("compare", cmd_compare, _args_compare,
     "compare [-f FMT] [-F FMT] [-s] [-q] [-U] IMAGE1 IMAGE2"),
    ("rm-ram", cmd_rm_ram, _args_rm_ram, "rm-ram NAME"),
    ("resize", cmd_resize, _args_resize,
     "resize [-f FMT] [--shrink] [-q] IMAGE [+|-]SIZE"),
    ("rebase", cmd_rebase, _args_rebase,
     "rebase [-f FMT] [-u] -b BACKING [-F FMT] IMAGE"),
    ("convert", cmd_convert, _args_convert,
     "convert [-f FMT] -O FMT [-o OPTS] [-c] [-p] [-U] "
     "[-B BACKING [-F FMT]] SRC DST"),
    ("migrate", cmd_migrate, _args_migrate,
     "migrate start SOURCE LOCAL.qcow2 [--rate BYTES/s] [-p] [--no-wait] "
     "| resume LOCAL.qcow2 [--rate BYTES/s] [-p] [--no-wait] "
     "| status LOCAL.qcow2 [--output=human|json] | cancel LOCAL.qcow2"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


DESCRIPTION = "VM disk images as block devices, through one driver code path."


def build_parser(verbs=None, prog=PROG, description=DESCRIPTION):
    parser = _Parser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="verb", metavar="VERB",
                                parser_class=_Parser)
    for name, handler, add_args, synopsis in verbs or VERBS:
        p = sub.add_parser(name, usage=f"{prog} {synopsis}",
                           help=synopsis.split(" ", 1)[-1])
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv=None, verbs=None, prog=PROG, description=DESCRIPTION):
    """Run one verb from `verbs` (default VERBS; hotplug adds its own;
    tapbridge runs its own table as command `prog`)."""
    parser = build_parser(verbs, prog, description)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return args.handler(args) or 0
    except (UsageError, ImageError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
