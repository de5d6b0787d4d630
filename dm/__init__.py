"""dm: device-mapper for nbdplug images.

Tables as data (table.py) and reloading them in place (ioctl.py); the
fast device's table (fast.py): what an image stores plainly goes
straight to its file through a loop device, the rest through the
image's NBD device and the driver; its live manager (manager.py), which
runs in the server beside the request path and promotes what the driver
allocates; and the nbdkit entry that runs it there (plugin.py).  It
imports nbdplug (plugin.py also nbdplug's plugin) and nothing else of
this repository.
"""
