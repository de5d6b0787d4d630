"""tapbridge: serve a Xen guest's disk from its blkif shared ring, through
the same nbdplug Disk objects the nbdkit plugin serves.

    abi        blkif, gntdev and evtchn layouts and constants (x86_64 and
               x86_32), asserted against Xen's headers by the tests
    ring       the back end of a shared ring
    dispatch   ring requests onto a Disk, on a worker pool
    transport  what the dispatcher needs from a transport
    shm        the shared-memory transport (tapbridge serve-shm)
    xen        the Xen transport: gntdev and evtchn
    vbd        the xenstore vbd backend (tapbridge serve-xen)
    cli        the tapbridge command

It imports nbdplug and nothing else of this repository.
"""
