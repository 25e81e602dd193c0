"""featstore.read.prefetch.in_thread: order, errors, early exit."""

from __future__ import annotations

import threading
import time

import pytest

from featstore.read.prefetch import in_thread


def test_items_arrive_in_order_and_the_producer_runs_ahead():
    produced = []

    def gen():
        for i in range(20):
            produced.append(i)
            yield i

    it = in_thread(gen(), maxsize=3)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(produced) >= 3  # read ahead while the consumer was busy
    assert [0, *it] == list(range(20))


def test_a_producer_error_is_raised_in_the_consumer():
    def gen():
        yield 1
        raise ValueError("slide 7 is corrupt")

    it = in_thread(gen())
    assert next(it) == 1
    with pytest.raises(ValueError, match="slide 7 is corrupt"):
        next(it)


def test_leaving_early_stops_the_producer():
    def gen():
        i = 0
        while True:
            i += 1
            yield i

    before = threading.active_count()
    for i in in_thread(gen(), maxsize=2, name="endless"):
        if i == 5:
            break
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "endless"]
    assert threading.active_count() <= before
