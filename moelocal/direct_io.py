"""Reads that bypass the page cache, without torch: the disk tier (store.py) and the experts' early
reads (preread.py, which run while torch is still being imported) share them.

O_DIRECT where the file system allows it, so that the page cache does not quietly hold a second
copy of the model; elsewhere each read is followed by a hint to drop its pages.
"""

import fcntl
import os

ALIGN = 4096  # O_DIRECT's alignment of file offsets, lengths and memory
IO_THREADS = 4  # disk reads in flight at once (io_queue.py), each with a staging buffer


def open_uncached(path) -> tuple[int, bool]:
    """A file descriptor whose reads bypass the page cache where the platform allows, and
    whether they need O_DIRECT's alignment: Linux O_DIRECT (not on tmpfs and some others),
    macOS F_NOCACHE, elsewhere plain reads (their pages dropped after, where posix_fadvise is)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:  # e.g. tmpfs
            pass
    fd = os.open(path, os.O_RDONLY)
    if hasattr(fcntl, "F_NOCACHE"):
        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
    return fd, False


def read_at(fd: int, view: memoryview, offset: int) -> int:
    """Read into view at a file offset; bytes read (0 at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # platforms without preadv: one more copy
    view.cast("B")[: len(data)] = data
    return len(data)


def read_fully(fd: int, direct: bool, view: memoryview, offset: int, need: int, pace=None) -> bool:
    """Fill view from a file offset; False when the file ends before `need` of its bytes (O_DIRECT
    reads whole blocks past a piece's end). A read through the page cache drops its pages after.
    pace: called before each read, the most bytes to read next (None: the rest; a multiple of
    ALIGN), to read in chunks."""
    got = 0
    while got < need:
        most = pace() if pace is not None else None
        n = read_at(fd, view[got:] if most is None else view[got : got + most], offset + got)
        if n <= 0:
            return False
        got += n
    if not direct and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, need, os.POSIX_FADV_DONTNEED)
    return True
