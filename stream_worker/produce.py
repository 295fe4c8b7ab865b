"""Replaying interaction logs (or generated clicks) into the events topic.

The plan (which events, in which order, with which timestamps) is pure and tested on
its own; :func:`send_events` paces and publishes it with kafka-python.
"""

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from model.data import InteractionLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    event_id: str
    user_id: str
    item_id: str
    event_type: str
    offset_ms: float  # when to send, relative to the start of the replay


def plan_replay(
    log: InteractionLog, speed: float = 0.0, limit: int | None = None
) -> list[PlannedEvent]:
    """Events in event-time order, timed ``speed`` times faster than they happened.

    ``speed`` 0 (or a log without timestamps) means no event-time pacing: the rate limit
    alone decides. Event ids are derived from the source and position, so replaying the
    same file twice produces the same ids.
    """
    ordered = log.in_event_time_order()[: limit if limit else None]
    prefix = hashlib.sha256(log.source.encode()).hexdigest()[:8]
    first_ts = next((it.ts_ms for it in ordered if it.ts_ms is not None), None)
    out = []
    for position, it in enumerate(ordered):
        offset = 0.0
        if speed > 0 and first_ts is not None and it.ts_ms is not None:
            offset = (it.ts_ms - first_ts) / speed
        out.append(
            PlannedEvent(f"{prefix}-{position}", it.user_id, it.item_id, it.event_type, offset)
        )
    return out


def generate_clicks(
    events: int, users: int = 100, items: int = 50, seed: int = 0
) -> list[PlannedEvent]:
    """Synthetic sessions: each user walks the catalogue from a random start, so the next
    item is predictable (a model trained on them recommends the walk's continuation)."""
    rng = np.random.default_rng(seed)
    position = rng.integers(0, items, size=users)
    out = []
    for n in range(events):
        user = int(rng.integers(users))
        item = int(position[user])
        position[user] = (item + 1) % items
        out.append(PlannedEvent(f"gen-{seed}-{n}", f"user-{user}", f"item-{item}", "view", 0.0))
    return out


def generated_log(
    users: int = 200, items: int = 50, length: int = 30, seed: int = 0
) -> dict[str, list[str]]:
    """Training sequences with the same walk structure as :func:`generate_clicks`."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in range(users):
        start = int(rng.integers(items))
        out[f"user-{u}"] = [f"item-{(start + t) % items}" for t in range(length)]
    return out


def paced(
    plan: Iterable[PlannedEvent],
    rate: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[PlannedEvent]:
    """Yield events no earlier than their event-time offset and no faster than ``rate``
    per second (0: unlimited)."""
    start = clock()
    interval = 1.0 / rate if rate > 0 else 0.0
    for n, event in enumerate(plan):
        due = start + max(event.offset_ms / 1000, n * interval)
        delay = due - clock()
        if delay > 0:
            sleep(delay)
        yield event


def send_events(
    producer: Any,
    topic: str,
    plan: list[PlannedEvent],
    *,
    rate: float = 0.0,
    progress: bool = True,
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> int:
    """Publish ``plan`` (key = user id), stamping each event with the wall-clock time it
    is sent, which is what the worker's timestamp window checks."""
    from stream_worker.events import event_value

    sent = 0
    with tqdm(total=len(plan), desc="produce", unit="ev", disable=not progress) as bar:
        for event in paced(plan, rate):
            value = event_value(
                event.event_id, event.user_id, event.item_id, event.event_type, clock_ms()
            )
            producer.send(topic, key=event.user_id.encode(), value=value)
            sent += 1
            if sent % 1000 == 0:
                bar.update(1000)
        bar.update(sent % 1000)
    producer.flush()
    return sent
