"""The train stream as the loop consumes it: activation batches from the source, optionally
produced ahead by a thread so that the LLM forward of the next batches overlaps the SAE steps
of this one (`data.prefetch_batches`), and timed either way (how fast activations come vs how
fast training goes, in summary.json).

A Stateful component standing in for the source in checkpoints: the producer runs ahead, so
the source's own position is past what the loop has used. Each batch travels with the
source's stream state right after producing it, and a checkpoint gets the state of the last
batch consumed: a resume continues exactly where the sequential order would, and the results
are the sequential order's (one producer, first in first out). The producer holds a lock
while it runs the model; evaluation takes it (`paused`) to use the model itself.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from framework.activations import ActivationSource, Batch
from framework.stateful import Saved, State, StateDict

_END = object()


class TrainStream:
    def __init__(self, source: ActivationSource, reader, depth: int):
        """`source`: the Stateful activation source; `reader`: what yields the train batches
        (the source, or its router under layer placement, which needs depth 0: it exchanges
        batches between ranks)."""
        self.source, self.reader, self.depth = source, reader, depth
        self.produce_seconds = 0.0  # time spent making activations (tokenise, forward, clean)
        self.produced_rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumed: dict | None = None  # the source's stream state after the last batch used
        self._thread: threading.Thread | None = None

    # -- Stateful ------------------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        if self._consumed is None:
            return self.source.state_dict()
        return StateDict(local=State(meta=copy.deepcopy(self._consumed)))

    def load_state_dict(self, saved: Saved) -> None:
        self.source.load_state_dict(saved)

    def skipped(self) -> dict[str, dict[str, int]]:
        """The source's skip counters, the train stream's as of the last batch used."""
        train = self._consumed["skipped"] if self._consumed is not None else self.source.skipped["train"]
        return {**self.source.skipped, "train": dict(train)}

    # -- the stream ------------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        return self._sequential() if self.depth == 0 else self._prefetched()

    def _timed_next(self, it) -> Batch | object:
        start = time.perf_counter()
        item = next(it, _END)
        self.produce_seconds += time.perf_counter() - start
        if item is not _END:
            self.produced_rows += next(iter(item.values())).shape[0]
        return item

    def _sequential(self) -> Iterator[Batch]:
        it = self.reader.batches("train")
        while (item := self._timed_next(it)) is not _END:
            yield item

    def _prefetched(self) -> Iterator[Batch]:
        self._consumed = copy.deepcopy(self.source.stream_state())
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(q,), name="activation-producer", daemon=True)
        self._thread.start()
        try:
            while True:
                item, state = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._consumed = state
                yield item
        finally:
            self.close()

    def _produce(self, q: queue.Queue) -> None:
        it = self.reader.batches("train")
        try:
            while not self._stop.is_set():
                with self._lock:
                    item = self._timed_next(it)
                    state = None if item is _END else copy.deepcopy(self.source.stream_state())
                self._put(q, (item, state))
                if item is _END:
                    return
        except BaseException as err:  # noqa: BLE001 (handed to the loop's thread, which raises it)
            self._put(q, (err, None))

    def _put(self, q: queue.Queue, entry) -> None:
        """Waits for room in bounded steps, so that close() never leaves the producer stuck."""
        while not self._stop.is_set():
            try:
                return q.put(entry, timeout=0.1)
            except queue.Full:
                continue

    @contextmanager
    def paused(self):
        """The producer waits (between batches) while the caller uses the model."""
        with self._lock:
            yield

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
