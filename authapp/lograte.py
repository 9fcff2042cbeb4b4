"""Log lines that an outage repeats on every request (a dead Redis, a lost database), at
most once per interval, each with the count of the lines left out since the last one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

DEFAULT_INTERVAL = 60.0


class ThrottledLog:
    """`log(level, event, msg, ...)` writes the first line of an event at once, then at
    most one per `interval` seconds, with `suppressed` = the lines left out before it."""

    def __init__(
        self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, event: str, msg: str, *args: Any, exc_info: Any = None, **extra: Any) -> bool:
        """Log it or count it; True when a line was written."""
        now = self._clock()
        with self._lock:
            last = self._last.get(event)
            if last is not None and now - last < self.interval:
                self._suppressed[event] = self._suppressed.get(event, 0) + 1
                return False
            self._last[event] = now
            suppressed = self._suppressed.pop(event, 0)
        self.logger.log(level, msg, *args, exc_info=exc_info, extra={**extra, "event": event, "suppressed": suppressed})
        return True
