"""Two hosts on one machine: network namespaces joined by a veth pair.

    with TwoHosts() as hosts:
        hosts.server.popen([...])           # runs on the "server" host
        hosts.client.run([...])             # and on the "client" host
        hosts.server.ip, hosts.server.ip6   # its addresses on the link

Both ends live in namespaces of their own (nothing is added to the
machine's own network, nothing leaves it); names carry our pid so runs
on one machine do not collide.  Leaving the block kills what is still
running in the namespaces (only our children run there) and removes
them, which removes the veth pair.
"""

import contextlib
import os
import signal
import subprocess

from conftest import run


class Host:
    def __init__(self, netns, ip, ip6):
        self.netns = netns
        self.ip = ip
        self.ip6 = ip6

    def argv(self, argv):
        return ["ip", "netns", "exec", self.netns] + [str(a) for a in argv]

    def run(self, argv, check=True, **kw):
        return run(self.argv(argv), check=check, **kw)

    def popen(self, argv, **kw):
        return subprocess.Popen(self.argv(argv), **kw)

    def pids(self):
        out = run(["ip", "netns", "pids", self.netns], check=False).stdout
        return [int(p) for p in out.split()]


class TwoHosts:
    PREFIX = 24
    PREFIX6 = 64

    def __init__(self, net="10.77.0", net6="fd00:77:"):
        tag = f"nbdp{os.getpid()}"
        self.server = Host(tag + "s", f"{net}.1", f"{net6}:1")
        self.client = Host(tag + "c", f"{net}.2", f"{net6}:2")

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self):
        a, b = self.server, self.client
        for host in (a, b):
            run(["ip", "netns", "add", host.netns])
        run(["ip", "link", "add", "veth0", "netns", a.netns, "type", "veth",
             "peer", "name", "veth0", "netns", b.netns])
        for host in (a, b):
            ip = ["ip", "-n", host.netns]
            run(ip + ["link", "set", "lo", "up"])
            run(ip + ["link", "set", "veth0", "up"])
            run(ip + ["addr", "add", f"{host.ip}/{self.PREFIX}",
                      "dev", "veth0"])
            # nodad: usable at once, not after duplicate detection.
            run(ip + ["-6", "addr", "add", f"{host.ip6}/{self.PREFIX6}",
                      "dev", "veth0", "nodad"])

    def close(self):
        for host in (self.server, self.client):
            for pid in host.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run(["ip", "netns", "del", host.netns], check=False)
