"""A background thread that prepares the next items of a deterministic sequence ahead of time.

The producer is the only code that advances the sequence while the thread runs, and items come
out in the order it made them, so prefetching never changes what is delivered. An exception in
the producer is raised by the `get` that would have returned its item.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class Prefetcher:
    """Calls `produce()` in a daemon thread, keeping up to `depth` results ready for `get()`."""

    def __init__(self, produce: Callable[[], Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(produce,), daemon=True,
                                        name="data-prefetch")
        self._thread.start()

    def get(self) -> Any:
        if self._error is not None:  # the producer stopped at this error
            raise self._error
        ok, value = self._queue.get()
        if not ok:
            self._error = value
            raise value
        return value

    def close(self) -> None:
        """Stop the thread; items it prepared but nobody took are dropped."""
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.01)

    def _run(self, produce: Callable[[], Any]) -> None:
        while not self._stop.is_set():
            try:
                item = (True, produce())
            except BaseException as e:  # handed to the consumer, which raises it
                item = (False, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return
