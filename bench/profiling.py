"""cProfile across every thread of a worker (the mesh's hot path spans three).

cProfile (Python 3.11) hooks one thread at a time, so a ``threading.setprofile``
trampoline starts a separate profiler in each thread the node creates (I/O,
dispatch) on its first event, next to one for the calling thread. Text reports
are per thread: what the publisher's thread pays is not what the I/O thread pays.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import sys
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def profiled(path: str | None, top: int = 25) -> Iterator[None]:
    """Profile the body and the threads it starts; write ``path``.txt and per-thread .prof."""
    if not path:
        yield
        return
    profiles: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()

    def boot(_frame: Any, _event: str, _arg: Any) -> None:
        sys.setprofile(None)
        prof = cProfile.Profile()
        with lock:
            profiles.append((threading.current_thread().name, prof))
        prof.enable()  # replaces this hook for the rest of the thread's life

    main = cProfile.Profile()
    threading.setprofile(boot)
    main.enable()
    try:
        yield
    finally:
        main.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        _write(path, [("caller (" + threading.current_thread().name + ")", main), *profiles], top)


def _write(path: str, profiles: list[tuple[str, cProfile.Profile]], top: int) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    out = io.StringIO()
    for index, (name, prof) in enumerate(profiles):
        # Threads that exited have stopped calling their profiler; snapshot what it saw.
        prof.create_stats()
        stats = pstats.Stats(prof, stream=out)
        if not stats.total_calls:  # type: ignore[attr-defined]
            continue
        stats.dump_stats(f"{path}.{index}.prof")
        out.write(f"\n===== thread: {name}  ({path}.{index}.prof)\n")
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
    with open(f"{path}.txt", "w") as fh:
        fh.write(out.getvalue())
