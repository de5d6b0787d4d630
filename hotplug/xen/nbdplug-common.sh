# Shared by nbdplug's Xen hotplug scripts (block-nbdplug, block-tapbridge).
# libxl runs a script as "SCRIPT add|remove" with stdin /dev/null and
# XENBUS_PATH=backend/vbd/<domid>/<devid>, relative to dom0's home in
# xenstore (xenstore-read and friends resolve it); success is exit 0.

PATH=$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PROG=${0##*/}

if [ -z "${XENBUS_PATH:-}" ]; then
    echo "$PROG: XENBUS_PATH is not set (run by libxl's hotplug)" >&2
    exit 2
fi

xs_read() {
    xenstore-read "$XENBUS_PATH/$1" 2>/dev/null
}

# xs_write KEY VALUE [KEY VALUE...]: all in one transaction.
xs_write() {
    n=$#
    while [ "$n" -gt 0 ]; do
        key=$1 value=$2
        shift 2
        set -- "$@" "$XENBUS_PATH/$key" "$value"
        n=$((n - 2))
    done
    xenstore-write "$@"
}

# Tell libxl (hotplug-error, logged) and the backend (hotplug-status).
fatal() {
    echo "$PROG: $*" >&2
    xs_write hotplug-error "$*" hotplug-status error
    exit 1
}

# The last line of a command's output, for one-line errors.
last_line() {
    printf '%s\n' "$1" | sed '/^[[:space:]]*$/d' | tail -n 1
}

# xl's target, [tap:|tap2:|tapdisk:][FMT:]PATH, into $fmt and $path.
# FMT is an nbdplug format (nbdplug checks it) or blktap's aio (raw) and
# vhd (vpc); without one the format is probed.  target= is the last disk
# key in xl's syntax, so PATH may hold commas and colons.
parse_target() {
    t=$1
    case $t in tap:*|tap2:*|tapdisk:*) t=${t#*:} ;; esac
    fmt=${t%%:*}
    case $t in
    *:*) case $fmt in ''|*[!a-z0-9_]*) fmt= ;; esac ;;
    *) fmt= ;;
    esac
    if [ -n "$fmt" ]; then
        path=${t#*:}
    else
        path=$t
    fi
    case $fmt in aio) fmt=raw ;; vhd) fmt=vpc ;; esac
}
