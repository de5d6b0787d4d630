"""dm: device-mapper tables for nbdplug images.

dm will own device-mapper tables as data (linear, zero, error, snapshot
targets), building a fast-path table from a driver's allocation map
(Disk.host_mapping), so that allocated extents go straight to the image
file with the kernel moving the data and only the rest passes through
userspace, and loading such tables with `dmsetup`.  It imports nbdplug
and nothing else of this repository.
"""
