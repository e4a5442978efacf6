"""Process-wide settings that make training and certification faster without changing results.

glibc's ``malloc`` serves blocks above a moving threshold (128 KiB at start) by fresh ``mmap``
calls and gives freed memory at the top of the heap back to the system; each such block is
page-faulted in again when it is next allocated. A training step allocates the same large
tensors every time (activations, gradients, the bound's outer products), so with the defaults
some of them are faulted in afresh at every step. Measured on this project's 2-core CPU
(``benchmarks/bench_allocator.py``, one thread, batch 50): a plain Wong-Kolter step takes
about 25% longer and a plain 4C3F step about 20% longer with glibc's defaults than with
:func:`steady_allocator`; LMT steps gain alike. The command line (``lipmargin ...``) calls it
at start; library users can call it once at the start of their own program.
"""

from __future__ import annotations

import os

#: glibc ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks above this size still come from ``mmap`` (and go back to the system when freed)
MMAP_THRESHOLD = 32 << 20
#: set to "default" to keep the C library's own allocator settings
ENV = "LIPMARGIN_ALLOCATOR"

_state = {"allocator": "default"}


def steady_allocator() -> str:
    """Keep freed memory in the process (glibc: no trimming, ``mmap`` only above 32 MiB), so
    that the same tensors allocated at every step are not page-faulted in afresh. Returns a
    description of the allocator now in use ("default" where nothing changed: not glibc, or
    ``LIPMARGIN_ALLOCATOR=default`` in the environment). Costs memory only up to the largest
    heap the process reached, which it keeps until it exits."""
    if os.environ.get(ENV, "").strip().lower() == "default":
        return _state["allocator"]
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(
            _M_MMAP_THRESHOLD, MMAP_THRESHOLD
        )
    except (OSError, AttributeError):  # not glibc
        return _state["allocator"]
    if ok:
        _state["allocator"] = "glibc malloc without trimming, mmap above 32 MiB"
    return _state["allocator"]


def allocator() -> str:
    """The allocator setting :func:`steady_allocator` left ("default" if never changed)."""
    return _state["allocator"]
