"""How long work reports progress without printing: library code takes a :class:`Monitor`.

The default monitor is silent; ``cli.py`` passes one that draws rich progress bars and log lines on
stderr. Library code never prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Monitor:
    """Silent progress: subclasses draw bars (``track``) and show messages (``log``)."""

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items

    def log(self, message: str) -> None:
        pass


SILENT = Monitor()
