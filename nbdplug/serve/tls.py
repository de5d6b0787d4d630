"""TLS files for nbdkit, checked before it runs.

nbdkit reads a PSK file (IDENTITY:HEXKEY lines, as psktool writes them)
or a directory holding ca-cert.pem, server-cert.pem and server-key.pem.
It takes a key file anyone may read without a word, and reports broken
certificates only as a GnuTLS error at start; here each problem is one
line naming the file.
"""

import os
import ssl
import stat

from nbdplug.errors import UsageError

# The files nbdkit reads from a --tls-certificates directory.
CERT_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def tls_args(psk=None, certs=None, verify_peer=False):
    """nbdkit's TLS options, after checking the files it will read; TLS
    is then required of every client (no downgrade to clear text)."""
    if psk and certs:
        raise UsageError("give --tls-psk or --tls-certs, not both")
    if verify_peer and not certs:
        raise UsageError("--tls-verify-peer needs --tls-certs (client "
                         "certificates are checked against its CA)")
    if psk:
        check_psk_file(psk)
        return ["--tls=require", f"--tls-psk={os.path.abspath(psk)}"]
    if certs:
        check_cert_dir(certs)
        return (["--tls=require",
                 f"--tls-certificates={os.path.abspath(certs)}"]
                + (["--tls-verify-peer"] if verify_peer else []))
    return []


def check_secret(path, what):
    """A key file must exist and be private to its owner, as ssh wants of
    private keys (nbdkit itself does not look)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{path}: {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: {what} is not a regular file")
    if st.st_mode & 0o077:
        raise UsageError(f"{path}: {what} is open to other users (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")


def check_psk_file(path):
    """IDENTITY:HEXKEY lines, as psktool writes them."""
    check_secret(path, "TLS PSK file")
    try:
        with open(path) as f:
            lines = f.read(1 << 20).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: TLS PSK file: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    keys = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        identity, sep, key = line.strip().partition(":")
        try:
            bytes.fromhex(key)
        except ValueError:
            sep = ""
        if not (identity and sep and key):
            raise UsageError(f"{path}: line {n}: expected IDENTITY:HEXKEY "
                             "(as psktool writes)")
        keys += 1
    if not keys:
        raise UsageError(f"{path}: TLS PSK file holds no keys")


def check_cert_dir(path):
    """The CA, the server certificate and its key, loadable and matching."""
    if not os.path.isdir(path):
        raise UsageError(f"{path}: TLS certificate directory: "
                         + ("not a directory" if os.path.exists(path)
                            else "No such file or directory"))
    files = [os.path.join(path, name) for name in CERT_FILES]
    for name, file in zip(CERT_FILES, files):
        if not os.path.isfile(file):
            raise UsageError(f"{path}: {name} is missing (a TLS certificate"
                             " directory holds " + ", ".join(CERT_FILES)
                             + ")")
    ca, cert, key = files
    check_secret(key, "TLS server key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_verify_locations(ca)
    except ssl.SSLError as e:
        raise UsageError(f"{ca}: not a PEM certificate ({e.reason})") \
            from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise UsageError(f"{path}: server-cert.pem and server-key.pem are "
                         f"not a PEM certificate and its key ({e.reason})") \
            from None
