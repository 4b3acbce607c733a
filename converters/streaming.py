"""Streaming tensors to a file or stream without holding the source in this process's memory.

The writers (safetensors, torch zip) hand every tensor to :func:`write_array_bytes`; a tensor mapped from a
source file is copied file to file by the kernel, or through one reused buffer, so a multi-GB conversion
keeps flat memory and does not evict the page cache.
"""

from __future__ import annotations

import dataclasses
import io
import mmap
import os
from typing import Any

import numpy as np

from convnextv2.reference.errors import BadInputError


def write_array_bytes(out: Any, array: np.ndarray) -> None:
    """Little-endian, C-order bytes of ``array`` into a TensorStreamer or any writable stream, in bounded chunks.

    The writers call this once per tensor, through the name each writer module imports (fault-injection
    tests replace it there)."""
    if isinstance(out, TensorStreamer):
        out.write_array(array)
        return
    with TensorStreamer(out, kernel_copy=False) as streamer:
        streamer.write_array(array)


# Bytes moved per system call / per bounce-buffer fill: large enough that call overhead is nothing, small
# enough that memory stays flat.
STREAM_CHUNK = 16 * 1024 * 1024
# Written data is handed to the disk every WRITEBACK_WINDOW bytes and waited for WRITEBACK_LAG windows later:
# the copy runs ahead of the disk by at most that much (what is dirty or in flight stays bounded), and the final
# fsync has little left, which drains while converters.save reads the output back. The pages stay cached (clean,
# reclaimable like any file's): that read-back reads them from memory, a fraction of reading them from the disk.
WRITEBACK_WINDOW = 64 * 1024 * 1024
WRITEBACK_LAG = 4
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


@dataclasses.dataclass(frozen=True)
class _MappedRegion:
    start: int
    end: int
    perms: str
    file_offset: int
    inode: int
    path: str


def _mapped_file_regions() -> list[_MappedRegion]:
    """This process's file mappings (/proc/self/maps); empty where there is no procfs."""
    regions = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    for line in lines:
        parts = line.rstrip("\n").split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[4] == "0":
            continue
        low, high = (int(x, 16) for x in parts[0].split("-"))
        regions.append(_MappedRegion(low, high, parts[1], int(parts[2], 16), int(parts[4]), parts[5]))
    regions.sort(key=lambda r: r.start)
    return regions


def _libc_function(name: str) -> Any:
    try:
        import ctypes

        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


class TensorStreamer:
    """Writes arrays to ``out`` without ever holding a whole source tensor in this process.

    - A C-contiguous array mapped read-only from a file (what our readers return) is copied from that file
      by the kernel (``copy_file_range``) when ``out`` is a plain file, or read in chunks into one reused
      buffer otherwise (a zip entry needs the bytes for its CRC). Its pages are never touched through the
      mapping, so they never count in this process's resident memory.
    - Any other C-contiguous array is written straight from its memory, chunk by chunk.
    - A strided view (a transpose of mapped data) is gathered slice by slice into the reused buffer; its
      source pages are then released from the mapping (``MADV_DONTNEED`` on a shared read-only file mapping
      drops them from this process only; the file and the page cache are untouched).
    """

    def __init__(self, out: Any, kernel_copy: bool = True):
        self.out = out
        self.regions: list[_MappedRegion] | None = None
        self.sources: dict[tuple[str, int], int] = {}
        self.buffer: np.ndarray | None = None
        self.fd: int | None = None
        if kernel_copy and hasattr(out, "fileno") and hasattr(os, "copy_file_range"):
            try:
                fd = out.fileno()
                import stat

                if stat.S_ISREG(os.fstat(fd).st_mode):
                    self.fd = fd
            except (OSError, ValueError, io.UnsupportedOperation):
                self.fd = None
        self.synced_to = 0
        self.kicked_to = 0
        self.kicks: list[int] = []  # the ends of the windows handed to the disk and not yet waited for
        self.sync_file_range = _libc_function("sync_file_range") if self.fd is not None else None

    def __enter__(self) -> TensorStreamer:
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in self.sources.values():
            os.close(fd)
        self.sources.clear()
        self.buffer = None

    # -------------------------------------------------------------- output side

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self.out.write(view)
            if written is None:  # a buffered or zip stream takes everything at once
                break
            view = view[written:]
        self._writeback()

    def flush(self) -> None:
        if hasattr(self.out, "flush"):
            self.out.flush()

    def _position(self) -> int:
        assert self.fd is not None
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def _writeback(self) -> None:
        if self.fd is None or self.sync_file_range is None:
            return
        position = self._position()
        if position - self.kicked_to < WRITEBACK_WINDOW:
            return
        import ctypes

        fd = self.fd
        # Start writing the new window without waiting; wait for the one WRITEBACK_LAG windows before it.
        self.sync_file_range(fd, ctypes.c_int64(self.kicked_to), ctypes.c_int64(position - self.kicked_to),
                             ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
        self.kicked_to = position
        self.kicks.append(position)
        if len(self.kicks) > WRITEBACK_LAG:
            wait_to = self.kicks.pop(0)
            self.sync_file_range(
                fd, ctypes.c_int64(self.synced_to), ctypes.c_int64(wait_to - self.synced_to),
                ctypes.c_uint(_SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER))
            self.synced_to = wait_to

    # -------------------------------------------------------------- input side

    def _region_of(self, low: int, high: int) -> _MappedRegion | None:
        if self.regions is None:
            self.regions = _mapped_file_regions()
        for region in self.regions:
            if region.start <= low and high <= region.end:
                return region
        return None

    def _source_fd(self, region: _MappedRegion) -> int | None:
        key = (region.path, region.inode)
        if key not in self.sources:
            try:
                fd = os.open(region.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
            # The name may now point at another file (replaced after it was mapped): use it only if it is
            # the mapped inode.
            if os.fstat(fd).st_ino != region.inode:
                os.close(fd)
                return None
            self.sources[key] = fd
        return self.sources[key]

    def _bounce(self, nbytes: int) -> np.ndarray:
        if self.buffer is None or self.buffer.size < nbytes:
            self.buffer = np.empty(max(nbytes, STREAM_CHUNK), dtype=np.uint8)
        return self.buffer[:nbytes]

    def write_array(self, array: np.ndarray) -> None:
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        nbytes = int(array.size) * array.dtype.itemsize
        if nbytes == 0:
            return
        if array.flags.c_contiguous:
            address = int(array.__array_interface__["data"][0])
            region = self._region_of(address, address + nbytes)
            source = self._source_fd(region) if region is not None else None
            if region is not None and source is not None:
                self._copy_from_file(source, region.file_offset + address - region.start, nbytes)
            else:
                flat = array.reshape(-1).view(np.uint8)
                for begin in range(0, nbytes, STREAM_CHUNK):
                    self.write(flat[begin: begin + STREAM_CHUNK])
            return
        self._write_strided(array)

    def _copy_from_file(self, source: int, offset: int, nbytes: int) -> None:
        end = offset + nbytes
        while offset < end:
            count = min(STREAM_CHUNK, end - offset)
            if self.fd is not None:
                try:
                    copied = os.copy_file_range(source, self.fd, count, offset)
                except OSError:
                    self.fd_copy_failed()
                    continue
                if copied <= 0:
                    raise BadInputError(f"source file ended {end - offset} bytes early while copying a tensor")
                offset += copied
                self._writeback()
                continue
            chunk = self._bounce(count)
            got = os.preadv(source, [chunk], offset)  # type: ignore[list-item]  # numpy stubs: ndarray is a Buffer
            if got <= 0:
                raise BadInputError(f"source file ended {end - offset} bytes early while copying a tensor")
            self.write(chunk[:got])
            offset += got

    def fd_copy_failed(self) -> None:
        # copy_file_range refused (old kernel, cross-filesystem on some kernels): the bounce buffer still works.
        self.fd = None

    def _write_strided(self, array: np.ndarray) -> None:
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
        row_bytes = max(1, rows.shape[1] * array.dtype.itemsize)
        per_block = max(1, STREAM_CHUNK // row_bytes)
        for begin in range(0, array.shape[0] if array.ndim else 1, per_block):
            block = array[begin: begin + per_block] if array.ndim else array
            target = self._bounce(int(block.size) * array.dtype.itemsize).view(array.dtype).reshape(block.shape)
            np.copyto(target, block)
            self.write(target.reshape(-1).view(np.uint8))
        self._release_mapped_pages(array)

    def _release_mapped_pages(self, array: np.ndarray) -> None:
        low, high = np.lib.array_utils.byte_bounds(array)
        region = self._region_of(low, high)
        # Only a shared, read-only file mapping may be dropped: its pages come back from the file. On private or
        # anonymous memory MADV_DONTNEED would discard data.
        if region is None or "w" in region.perms or region.perms[3:4] != "s":
            return
        madvise = _libc_function("madvise")
        if madvise is None:
            return
        import ctypes

        page = mmap.PAGESIZE
        start = (low + page - 1) // page * page  # only whole pages inside the tensor's span
        stop = high // page * page
        if stop > start:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), ctypes.c_int(mmap.MADV_DONTNEED))
