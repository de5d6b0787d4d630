"""Compressed clusters: raw deflate (zlib) or zstd frames, bounded.

Decompression stops once a whole cluster has been produced, so a hostile
stream cannot make us allocate more than one cluster of output.
"""

import io
import zlib

from . import structs as S


def decompress(data, ctype, cluster_size):
    """One cluster from `data`; None if the stream does not yield one."""
    if ctype == S.COMPRESSION_ZLIB:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(data, cluster_size)
        except zlib.error:
            return None
    else:
        import zstandard        # Debian's python3-zstandard
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True)
        out = bytearray()
        try:
            while len(out) < cluster_size:
                chunk = reader.read(cluster_size - len(out))
                if not chunk:
                    break
                out += chunk
        except zstandard.ZstdError:
            return None
    return out if len(out) == cluster_size else None


def compress(data, ctype):
    """Compressed form of one cluster, or None if it does not shrink."""
    if ctype == S.COMPRESSION_ZLIB:
        c = zlib.compressobj(6, zlib.DEFLATED, -12)
        out = c.compress(data) + c.flush()
    else:
        import zstandard
        out = zstandard.ZstdCompressor(level=5).compress(data)
    return out if len(out) < len(data) else None
