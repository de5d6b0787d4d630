"""tapbridge: serve a Xen guest's disk from its blkif shared ring.

tapbridge will own the Xen blkif ring ABI (native x86_64 and x86_32
request/response layouts, measured against Xen's headers), the ring
transports (Xen grant and event-channel devices, and a shared-memory
transport for tests and local use), the dispatcher that turns ring
requests into calls on an nbdplug Disk (the same driver objects the nbdkit
plugin serves), the xenstore backend state machine, and the `tapbridge`
command.  It imports nbdplug and nothing else of this repository.
"""
