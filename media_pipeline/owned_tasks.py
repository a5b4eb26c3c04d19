"""Tasks an object starts and owns: kept until done, a failure logged, all cancelled by their owner."""

import asyncio
import logging
from collections.abc import Awaitable, Iterator


class OwnedTasks:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __iter__(self) -> Iterator[asyncio.Task]:
        return iter(list(self._tasks))
