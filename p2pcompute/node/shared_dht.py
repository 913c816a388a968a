"""The node's one DHT handle and the lock that serialises its pipe among the control API, announcer and supervisor."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import hivemind


@dataclasses.dataclass(frozen=True)
class SharedDHT:
    """`with shared.held() as dht:` for every DHT call made from the node's threads (not the trainer's own)."""

    dht: "hivemind.DHT"
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)

    @contextlib.contextmanager
    def held(self) -> Iterator["hivemind.DHT"]:
        with self.lock:
            yield self.dht
