"""The `tapbridge` command.

    tapbridge serve-shm DIR IMAGE [-f FMT] [--order N]
        [--protocol x86_64-abi|x86_32-abi] [--readonly] [--workers N]
        [--persistent]
    tapbridge serve-xen [--domid N] [--xenstore SOCKET] [--workers N]
        [--no-persistent]

A user error prints one line and exits 2; a frontend that overruns its
ring stops that ring with one line and exit status 1; SIGTERM finishes the
requests in flight, flushes and exits 0.
"""

import logging
import os
import signal
import sys

from nbdplug import cli
from nbdplug.errors import UsageError
from nbdplug.opener import open_image

from .abi import MAX_RING_PAGE_ORDER, PROTOCOLS, X86_64
from .dispatch import DEFAULT_WORKERS, Dispatcher
from .ring import RingOverrun
from .shm import RING, ShmTransport

PROG = "tapbridge"


def cmd_serve_shm(args):
    if not 0 <= args.order <= MAX_RING_PAGE_ORDER:
        raise UsageError(f"--order {args.order}: expected 0 to "
                         f"{MAX_RING_PAGE_ORDER}")
    protocol = PROTOCOLS[args.protocol]
    with open_image(args.image, args.format, readonly=args.readonly) as disk:
        transport = ShmTransport(args.dir, args.order,
                                 persistent=args.persistent)
        try:
            dispatcher = Dispatcher(disk, transport, protocol,
                                    readonly=args.readonly,
                                    workers=args.workers)
        except RingOverrun as e:
            transport.close()
            raise UsageError(f"{os.path.join(args.dir, RING)}: {e}")
        try:
            return _serve(dispatcher, os.path.join(args.dir, RING))
        finally:
            dispatcher.close()
            transport.close()


def _serve(dispatcher, where):
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: dispatcher.stop())
    ring = dispatcher.ring
    print(f"serving {where}: {dispatcher.protocol.name}, {ring.size} "
          f"entries, from index {ring.req_cons}", flush=True)
    try:
        dispatcher.serve()
    except RingOverrun as e:
        print(f"{PROG}: {where}: {e}; ring halted", file=sys.stderr)
        return 1
    return 0


def cmd_serve_xen(args):
    """The vbd backend daemon: serve every block-tapbridge device of this
    domain until SIGTERM."""
    import pyxs
    from .vbd import VbdBackend, Xenstore
    from .xen import XenTransport
    try:
        xs = Xenstore(args.xenstore)
    except pyxs.PyXSError as e:
        raise UsageError(f"cannot reach xenstored: {e}") from None
    backend = VbdBackend(xs, XenTransport, domid=args.domid,
                         workers=args.workers,
                         persistent=not args.no_persistent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: backend.stop())
    try:
        backend.run()
    finally:
        xs.close()


def _args_serve_xen(p):
    p.add_argument("--domid", type=int, default=0,
                   help="the domain we serve from (default 0)")
    p.add_argument("--xenstore", metavar="SOCKET",
                   help="xenstored's socket (default: $XENSTORED_PATH or "
                   "/var/run/xenstored/socket)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="threads calling the image driver, per device")
    p.add_argument("--no-persistent", action="store_true",
                   help="do not offer persistent grants (feature-persistent)")


def _args_serve_shm(p):
    cli.add_format(p)
    p.add_argument("--order", type=int, default=0,
                   help="ring-page-order: the ring is 4096 << N bytes")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   default=X86_64.name)
    p.add_argument("--readonly", "-r", action="store_true")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="threads calling the image driver")
    p.add_argument("--persistent", action="store_true",
                   help="keep data pages mapped, as for persistent grants")
    p.add_argument("dir")
    p.add_argument("image")


VERBS = [
    ("serve-shm", cmd_serve_shm, _args_serve_shm,
     "serve-shm DIR IMAGE [-f FMT] [--order N] "
     "[--protocol x86_64-abi|x86_32-abi] [--readonly] [--workers N] "
     "[--persistent]"),
    ("serve-xen", cmd_serve_xen, _args_serve_xen,
     "serve-xen [--domid N] [--xenstore SOCKET] [--workers N] "
     "[--no-persistent]"),
]


def main(argv=None):
    logging.basicConfig(format=f"{PROG}: %(message)s", level=logging.INFO)
    return cli.main(argv, VERBS, PROG, "Serve a Xen guest's virtual disk "
                    "from the blkif shared ring through nbdplug's image "
                    "drivers.")


if __name__ == "__main__":
    sys.exit(main())
