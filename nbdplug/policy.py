"""Which files an image may make us open besides itself.

Backing files, VMDK extents, VHD parent locators and qcow2 data files are
names chosen by whoever wrote the image: a guest, another host.  One
policy decides for every format whether such a name may be opened.  A file
is allowed only if, after resolving symlinks, it lies under an allowed
root (by default the directory tree of the top image), it is a regular file
unless block devices are explicitly allowed, and it is not the referring
image itself.
"""

import os
import stat

from .errors import PolicyError


class OpenPolicy:
    """Rules for files an image refers to.

    roots:         extra directories under which referenced files may lie;
    no_backing:    refuse every referenced file;
    allow_devices: permit block devices as referenced files;
    image_root:    also allow the top image's own directory (default).
    """

    def __init__(self, roots=(), no_backing=False, allow_devices=False,
                 image_root=True):
        self.roots = [os.path.realpath(r) for r in roots]
        self.no_backing = no_backing
        self.allow_devices = allow_devices
        self.image_root = image_root

    def for_image(self, image_path):
        """The policy for one chain: the top image's directory joins the
        allowed roots (once, so deeper links cannot widen it)."""
        roots = list(self.roots)
        if self.image_root:
            roots.append(os.path.dirname(os.path.realpath(image_path)))
        return OpenPolicy(roots, self.no_backing, self.allow_devices,
                          image_root=False)

    def resolve(self, referrer, name, fmt, field):
        """Resolve `name` found in `referrer` to a path we may open.

        Relative names are taken against the referrer's directory, as
        qemu does.  Raises PolicyError naming the field on refusal.
        """
        if self.no_backing:
            raise PolicyError(referrer, fmt,
                              f"refers to {name!r}, and referenced files "
                              "are refused (--no-backing)", field)
        if not name or "\0" in name:
            raise PolicyError(referrer, fmt, "empty or invalid file name",
                              field)
        base = os.path.dirname(os.path.abspath(referrer))
        path = os.path.realpath(os.path.join(base, name))
        if not any(path == r or path.startswith(r.rstrip("/") + "/")
                   for r in self.roots):
            raise PolicyError(referrer, fmt,
                              f"{name!r} resolves to {path}, outside the "
                              "allowed directories (see --backing-root)",
                              field)
        if path == os.path.realpath(referrer):
            raise PolicyError(referrer, fmt,
                              f"{name!r} refers to the image itself", field)
        try:
            st = os.stat(path)
        except OSError as e:
            raise PolicyError(referrer, fmt,
                              f"cannot open {name!r}: {e.strerror}", field)
        if stat.S_ISBLK(st.st_mode):
            if not self.allow_devices:
                raise PolicyError(referrer, fmt,
                                  f"{name!r} is a block device, which is "
                                  "not allowed here", field)
        elif not stat.S_ISREG(st.st_mode):
            raise PolicyError(referrer, fmt,
                              f"{name!r} is not a regular file", field)
        return path


DEFAULT = OpenPolicy()
