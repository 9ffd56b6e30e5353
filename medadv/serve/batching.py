"""Micro-batching: concurrent requests share one forward pass.

Each request submits its rows (the image and its squeezed versions, already at the network's input
size); one task on the event loop takes the first waiting request, then keeps collecting until
``max_batch`` images are in or ``max_wait_ms`` have passed since the first, runs the model once on
one worker thread, and hands each request its rows back. Under no load a request waits at most
``max_wait_ms``; under load the batches fill and throughput grows with concurrency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    sizes: Counter = field(default_factory=Counter)  # images per batch -> count
    largest: int = 0
    model_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images, "largest": self.largest,
                "mean_batch": round(self.images / self.batches, 3) if self.batches else 0.0,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "model_seconds": round(self.model_seconds, 3)}


class MicroBatcher:
    """``await submit(rows)`` -> the model's outputs for those rows; ``fn`` maps a stacked batch to outputs."""

    def __init__(self, fn: Callable[[Any], np.ndarray], stack: Callable[[list[Any]], Any], *, max_batch: int = 16,
                 max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn, self.stack = fn, stack
        self.max_batch, self.max_wait = int(max_batch), max(0.0, float(max_wait_ms)) / 1000.0
        self.stats = BatchStats()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medadv-model")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not loop or self._task is None or self._task.done():
                self._loop, self._queue = loop, asyncio.Queue()
                self._task = loop.create_task(self._run(self._queue))
            assert self._queue is not None
            return self._queue

    async def submit(self, rows: Any) -> np.ndarray:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._ensure().put((rows, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            items = [first]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                try:
                    items.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(rows, fut) for rows, fut in items if not fut.cancelled()]
            if not live:
                continue
            try:
                t0 = time.perf_counter()
                batch = self.stack([rows for rows, _ in live])
                out = await loop.run_in_executor(self._pool, self.fn, batch)
                self.stats.model_seconds += time.perf_counter() - t0
            except Exception as exc:  # every waiter gets the failure; the loop goes on
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.images += len(live)
            self.stats.sizes[len(live)] += 1
            self.stats.largest = max(self.stats.largest, len(live))
            start = 0
            for rows, fut in live:
                n = len(rows)
                if not fut.done():
                    fut.set_result(out[start:start + n])
                start += n

    def close(self) -> None:
        if self._task is not None and not self._task.done() and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._pool.shutdown(wait=False, cancel_futures=True)
