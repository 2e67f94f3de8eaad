"""Read tar shards fast: one `read` per member, from local files, `pipe:` commands and http(s) URLs alike.

    with open_shard("shards/train-000000.tar") as stream:       # or iter_raw_samples(url)
        for member in iter_tar_members(stream, url): ...       # {"fname", "data", "__url__"}

tarfile's stream mode ("r|*", used by webdataset) reads members through 10 KiB chunks that it joins and slices
again, about 170 MB/s on our machines, too slow to keep a GPU fed with 150 MB volumes; this reader runs at
page-cache speed (about 1.2 GB/s). It yields what webdataset's `tar_file_iterator` yields, so webdataset's
`group_by_keys` turns its output into samples.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager

import webdataset as wds
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys

# Read buffer for shard streams (local files, pipe: commands): large reads for 10-150 MB members.
READ_BUFSIZE = 1 << 20


@contextmanager
def open_shard(url: str):
    """A readable stream of one shard: a local path, a `pipe:` command or an http(s) URL (webdataset's gopen).
    Closing it checks a pipe command's exit status, so a failed download raises here, not silently."""
    stream = wds.gopen(url, bufsize=READ_BUFSIZE)
    try:
        yield stream
    except BaseException:
        close_quietly(stream)  # the error being raised is the useful one
        raise
    else:
        stream.close()


def iter_raw_samples(url: str) -> Iterator[dict]:
    """Raw samples of one shard ({"__key__", "__url__", "<ext>": bytes, ...}) in tar order; damage raises."""
    with open_shard(url) as stream:
        yield from group_by_keys(iter_tar_members(stream, url), handler=reraise_exception)


def iter_tar_members(stream, url: str):
    """{"fname", "data", "__url__"} per regular file of a tar stream (what webdataset's tar_file_iterator
    yields), reading each member with one `read` call.

    It handles ustar, GNU long names, pax headers and gzip-compressed shards; damage raises tarfile.ReadError.
    """
    first = _read_exactly(stream, tarfile.BLOCKSIZE)
    if first[:2] == b"\x1f\x8b":  # a .tar.gz shard
        stream = gzip.GzipFile(fileobj=_Prefixed(first, stream))
        first = _read_exactly(stream, tarfile.BLOCKSIZE)
    header, next_name, next_size = first, None, None
    while header:
        if len(header) < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"truncated tar header ({len(header)} bytes)")
        try:
            member = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
        except tarfile.EOFHeaderError:
            return  # the zero block that ends the archive
        size = member.size if next_size is None else next_size
        data = _read_exactly(stream, size)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data in {member.name}: {len(data)} of {size} bytes")
        _read_exactly(stream, -size % tarfile.BLOCKSIZE)  # padding to the next block
        if member.type == tarfile.GNUTYPE_LONGNAME:
            next_name = data.rstrip(b"\0").decode(tarfile.ENCODING, "surrogateescape")
        elif member.type == tarfile.XHDTYPE:  # pax records "<length> <key>=<value>\n" for the next member
            records = dict(_pax_records(data))
            next_name = records.get("path", next_name)
            next_size = int(records["size"]) if "size" in records else next_size
        else:
            if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                yield {"fname": next_name or member.name, "data": data, "__url__": url}
            next_name, next_size = None, None
        header = _read_exactly(stream, tarfile.BLOCKSIZE)


def _pax_records(data: bytes):
    position = 0
    while position < len(data):
        length = int(data[position : data.index(b" ", position)])
        key, _, value = data[data.index(b" ", position) + 1 : position + length - 1].partition(b"=")
        yield key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        position += length


def _read_exactly(stream, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream (a raw pipe may return short reads)."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        part = stream.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class _Prefixed(io.RawIOBase):
    """A stream that returns `prefix` first, then the rest of `stream` (to hand already-read bytes to gzip)."""

    def __init__(self, prefix: bytes, stream):
        self.prefix, self.stream = prefix, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.prefix:
            count = min(len(buffer), len(self.prefix))
            buffer[:count], self.prefix = self.prefix[:count], self.prefix[count:]
            return count
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def close_quietly(stream) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - the read error already being reported is the useful one
        pass
