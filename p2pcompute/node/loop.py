"""A private asyncio event loop in a daemon thread: where the node's own libp2p protocols run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Coroutine

logger = logging.getLogger(__name__)

LOOP_SHUTDOWN_TIMEOUT = 10.0  # seconds to let running handlers finish when the node stops


class BackgroundLoop:
    """`start()` spins up the loop; `run(coro, timeout)` executes a coroutine on it from any thread."""

    def __init__(self, name: str = "p2pc-protocols"):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> "BackgroundLoop":
        self._thread.start()
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def run(self, coro: Coroutine, timeout: float) -> Any:
        """Run `coro` on the loop and wait at most `timeout` seconds (raises TimeoutError, cancelling it)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"operation did not finish within {timeout:.1f} s") from None

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def shutdown(self) -> None:
        if not self._thread.is_alive():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_all(), LOOP_SHUTDOWN_TIMEOUT)
        except TimeoutError:
            logger.warning("protocol handlers did not stop within %.0f s; stopping the loop anyway",
                           LOOP_SHUTDOWN_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(LOOP_SHUTDOWN_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()
