"""The `tapbridge` command (its serving verbs arrive with the ring)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tapbridge",
        description="Serve a Xen guest's virtual disk from the blkif "
        "shared ring through nbdplug's image drivers.")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
