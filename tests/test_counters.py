"""The counters the engine and the disk cache share: changes from many threads are never lost."""

from __future__ import annotations

import dataclasses
import threading

from common.counters import Counters


@dataclasses.dataclass
class Pair(Counters):
    hits: int = 0
    bytes: int = 0


def test_adds_from_many_threads_are_all_counted() -> None:
    counters = Pair()
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        for _ in range(5000):
            counters.add(hits=1, bytes=3)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.snapshot() == {"hits": 20000, "bytes": 60000}


def test_a_snapshot_holds_only_the_counters() -> None:
    counters = Pair()
    counters.add(hits=2)
    assert counters.snapshot() == {"hits": 2, "bytes": 0}
