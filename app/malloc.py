"""glibc's allocator, set for the output path's buffers of a megabyte or so.

Output moves as batches of up to a mebibyte: read from a pipe, put in a protobuf message, serialized,
framed, parsed again and encoded for the WebSocket. By default glibc serves each allocation over
128 KiB with a fresh mmap and hands it back with munmap when it is freed; its threshold then rises to
the size of what was freed, but each trim of the heap above 256 KiB starts the cycle again. The
kernel zeroes every page of every such mapping, and faults it in on first touch: serializing an
OutputBatch of several chunks that add up to 1 MiB cost 1.0 to 1.2 ms that way, against 0.1 ms
from the heap (measured with protobuf's upb backend, which grows its buffer as it encodes).

tune() sets both thresholds once, at the start of a process that moves output (the API server,
the agent, a capsule's supervisor): allocations under MMAP_THRESHOLD_BYTES come from the heap, and
the heap keeps up to TRIM_THRESHOLD_BYTES free at its top instead of handing it back at once. A
few mebibytes at most stay with the process that way. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

# mallopt(3)'s parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Over the biggest buffer a batch needs: a serialized batch of 1 MiB grows its buffer past 2 MiB.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
# Room at the top for the biggest of those buffers, freed and asked for again, and no more: every
# mebibyte kept free there counts in the RSS of a supervisor that holds a full output log.
TRIM_THRESHOLD_BYTES = MMAP_THRESHOLD_BYTES


def tune() -> bool:
    """Sets glibc's thresholds for this process; True when they were set."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    except (ValueError, OSError, AttributeError):  # no such confstr name, or no such symbol
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not done:
        logger.debug("mallopt refused the output path's thresholds")
    return done
