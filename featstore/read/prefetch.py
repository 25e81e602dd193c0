"""Run an iterator in a background thread, a few items ahead of its consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def in_thread(items: Iterable[T], maxsize: int = 2, name: str = "prefetch") -> Iterator[T]:
    """Yield *items* produced by a daemon thread up to *maxsize* ahead; re-raise its errors.

    Used where producing an item (reading a bag, planning a slide) should overlap the work done
    with the previous one. Leaving the loop early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer
            q.put(exc)

    t = threading.Thread(target=produce, name=name, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
