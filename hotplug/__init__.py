"""hotplug: making a block device for an image appear in dom0, and go away.

hotplug will own kernel NBD attach (nbd-client to an nbdkit Unix socket),
the nbdfuse + loop fallback where the kernel has no NBD, waiting for
devices on udev events (pyudev), partitions read in userspace (pyparted)
and mapped where the kernel does not, the attachment state under
/run/nbdplug, and the Xen hotplug scripts and udev rules.  It imports
nbdplug and dm; pyudev and pyparted are used here and nowhere else.
"""

# dm over kernel NBD and loop devices, kernel NBD, or nbdfuse + loop
VIA = ("fast", "nbd", "loop")
