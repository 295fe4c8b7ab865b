"""Online/offline parity: the same leave-one-out protocol as ``recstream evaluate``, once
through the real path (producer -> Kafka -> worker -> recommendations topic) and once
offline, on the same users and the same version.

Each user's history without its last item is replayed as events under a fresh user id
(``replay-<run>-<user>``, so a deployment's state is never touched); the recommendation
published after the user's last replayed event is its online answer, scored against the
held-out item. The offline answer is the version's encoder and item embeddings scoring
every item for the same history, seen items removed, as ``evaluate`` does.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.artifacts import LoadedVersion
from model.sasrec import takes_event_types
from model.sequences import encoder_input, pad_left, type_codes

logger = logging.getLogger(__name__)

K = 10
TIE = 1e-5  # scores closer than this rank either way (float error between the two paths)


@dataclass(frozen=True)
class ReplayUser:
    user: str  # the dataset's id
    history: list[str]  # every item but the last
    target: str  # the held-out last item
    types: list[str] = field(default_factory=list)  # the history's event types (or "view")

    def type_of(self, position: int) -> str:
        return self.types[position] if position < len(self.types) else "view"

    def history_types(self) -> list[str]:
        """The type sent with each history item."""
        return [self.type_of(position) for position in range(len(self.history))]


@dataclass
class Answer:
    items: list[str]
    scores: list[float] = field(default_factory=list)


def plan(
    sequences: Mapping[str, Sequence[str]],
    users: int | None = None,
    event_types: Mapping[str, Sequence[str]] | None = None,
) -> list[ReplayUser]:
    """Users with a history and a target (at least 2 items; ``evaluate``'s rule), in the
    dataset's order; the first ``users`` of them. ``event_types`` (per user, aligned with
    the items) are sent with the events."""
    types = event_types or {}
    chosen = [
        ReplayUser(user, list(items[:-1]), items[-1], list(types.get(user, ()))[: len(items) - 1])
        for user, items in sequences.items()
        if len(items) >= 2
    ]
    return chosen[:users] if users else chosen


@torch.no_grad()
def offline_answers(
    loaded: LoadedVersion, users: Sequence[ReplayUser], k: int = K
) -> dict[str, Answer]:
    """The version's top ``k`` for each history, scored as ``evaluate`` scores: the encoder
    on the newest ``max_len`` known items, every item by inner product, padding and
    seen items removed (a history with no known item: no answer)."""
    index = loaded.item_index()
    typed = takes_event_types(loaded.encoder)
    emb = torch.from_numpy(loaded.item_embeddings)
    out: dict[str, Answer] = {}
    batch = 256
    for start in range(0, len(users), batch):
        chunk = [u for u in users[start : start + batch]]
        encoded = [
            encoder_input(u.history, index, type_codes(u.history_types()) if typed else None)
            for u in chunk
        ]
        known = [indices for indices, _ in encoded]
        rows = [n for n, h in enumerate(known) if h]
        if not rows:
            continue
        seqs = torch.from_numpy(pad_left([encoded[n][1] for n in rows], loaded.max_len))
        scores = loaded.encoder(seqs) @ emb.T
        scores[:, 0] = -torch.inf
        for row, n in enumerate(rows):
            scores[row, torch.as_tensor(known[n])] = -torch.inf
        top = torch.topk(scores, min(k, scores.size(1) - 1), dim=1)
        for row, n in enumerate(rows):
            items = [loaded.item_ids[i] for i in top.indices[row].tolist()]
            out[chunk[n].user] = Answer(items, top.values[row].tolist())
    return out


def metrics(
    answers: Mapping[str, Answer], users: Sequence[ReplayUser], k: int = K
) -> dict[str, float]:
    """HR@k and NDCG@k over ``users`` (a user without an answer counts as a miss)."""
    hits = gains = 0.0
    for u in users:
        answer = answers.get(u.user)
        if answer is not None and u.target in answer.items[:k]:
            rank = answer.items.index(u.target)
            hits += 1
            gains += 1.0 / math.log2(rank + 2)
    n = max(1, len(users))
    return {f"hr@{k}": round(hits / n, 4), f"ndcg@{k}": round(gains / n, 4)}


def differences(
    online: Mapping[str, Answer],
    offline: Mapping[str, Answer],
    users: Sequence[ReplayUser],
    history_length: int,
) -> list[dict[str, Any]]:
    """Users whose online list is not the offline top-k, each with the likeliest reason:
    ``tie`` (the lists differ only where offline scores are within ``TIE``: float error
    between TorchScript-on-the-worker and here orders them either way), ``history
    truncated`` (the worker keeps ``history_length`` items, so an older item can come back),
    ``no answer`` (nothing published for the last replayed event), or ``differs``."""
    out: list[dict[str, Any]] = []
    for u in users:
        on, off = online.get(u.user), offline.get(u.user)
        if on is None:
            out.append({"user": u.user, "reason": "no answer"})
            continue
        if off is None or on.items == off.items:
            continue
        if len(u.history) > history_length:
            reason = "history truncated"
        elif _tied(on.items, off):
            reason = "tie"
        else:
            reason = "differs"
        pairs = zip(on.items, off.items, strict=False)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(off.items))
        shown = slice(first, first + 3)
        out.append(
            {"user": u.user, "reason": reason, "position": first,
             "online": on.items[shown], "offline": off.items[shown]}
        )  # fmt: skip
    return out


def _tied(online: list[str], offline: Answer) -> bool:
    """True when the two lists hold the same items up to reorderings among offline
    scores within ``TIE`` of each other (and, at the cut, items tied with the last)."""
    score = dict(zip(offline.items, offline.scores, strict=True))
    last = offline.scores[-1] if offline.scores else -math.inf
    for a, b in zip(online, offline.items, strict=False):
        if a == b:
            continue
        sa = score.get(a)
        if sa is None:  # beyond the offline top-k: tied only with the cut
            if abs(score[b] - last) > TIE:
                return False
            continue
        if abs(sa - score[b]) > TIE:
            return False
    return True


def event_stream(users: Sequence[ReplayUser], run: str) -> Iterable[tuple[str, str, str, str, str]]:
    """(event id, replay user id, item, dataset user, event type) for each history item,
    users interleaved round-robin (as many users click at once), each user's items in
    order."""
    longest = max((len(u.history) for u in users), default=0)
    for position in range(longest):
        for u in users:
            if position < len(u.history):
                yield (f"{run}-{u.user}-{position}", replay_id(run, u.user),
                       u.history[position], u.user, u.type_of(position))  # fmt: skip


def replay_id(run: str, user: str) -> str:
    return f"replay-{run}-{user}"


def new_run() -> str:
    return uuid.uuid4().hex[:8]


def run_replay(
    producer_options: Mapping[str, Any],
    consumer_options: Mapping[str, Any],
    topics: tuple[str, str],
    users: Sequence[ReplayUser],
    *,
    timeout_s: float = 600.0,
) -> dict[str, Answer]:
    """Replay ``users`` into ``topics[0]`` and collect, from ``topics[1]``, the answer to
    each user's last replayed event (dataset user -> items). Reads only what is published
    after the replay starts."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from stream_worker.events import event_value

    run = new_run()
    events_topic, recs_topic = topics
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **consumer_options)
    partitions = [
        TopicPartition(recs_topic, p) for p in consumer.partitions_for_topic(recs_topic) or []
    ]
    consumer.assign(partitions)
    for tp, end in consumer.end_offsets(partitions).items():
        consumer.seek(tp, end)
    last_event: dict[str, str] = {}  # replay id -> its last event id
    owner: dict[str, str] = {}  # replay id -> dataset user
    producer = KafkaProducer(linger_ms=5, acks="all", **producer_options)
    try:
        now = int(time.time() * 1000)
        for n, (event_id, rid, item, user, kind) in enumerate(event_stream(users, run)):
            value = event_value(event_id, rid, item, kind, now + n // 1000)
            producer.send(events_topic, key=rid.encode(), value=value)
            last_event[rid] = event_id
            owner[rid] = user
        producer.flush()
    finally:
        producer.close()
    answers: dict[str, Answer] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(answers) < len(last_event) and time.monotonic() < deadline:
            for records in consumer.poll(500).values():
                for record in records:
                    doc = json.loads(record.value)
                    rid = doc["user_id"]
                    if rid in last_event and doc["source_event_id"] == last_event[rid]:
                        items = [i["item_id"] for i in doc["items"]]
                        answers[owner[rid]] = Answer(items, [i["score"] for i in doc["items"]])
    finally:
        consumer.close()
    if len(answers) < len(last_event):
        logger.warning("%d of %d users got no answer within %gs", len(last_event) - len(answers),
                       len(last_event), timeout_s)  # fmt: skip
    return answers


def report(
    users: Sequence[ReplayUser],
    online: Mapping[str, Answer],
    offline: Mapping[str, Answer],
    version: str,
    history_length: int,
) -> tuple[dict[str, Any], str]:
    """The JSON line and a readable table of the users whose lists differ."""
    diff = differences(online, offline, users, history_length)
    reasons: dict[str, int] = {}
    for d in diff:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    doc = {
        "version": version,
        "users": len(users),
        "online": metrics(online, users),
        "offline": metrics(offline, users),
        "differing_users": len(diff),
        "differing_by_reason": reasons,
    }
    lines = ["| user | reason | first differing position | online | offline |",
             "|---|---|---|---|---|"]  # fmt: skip
    for d in diff[:50]:
        online_items, offline_items = (
            ", ".join(d.get("online", [])),
            ", ".join(d.get("offline", [])),
        )
        lines.append(
            f"| {d['user']} | {d['reason']} | {d.get('position', '-')} | {online_items} "
            f"| {offline_items} |"
        )
    if len(diff) > 50:
        lines.append(f"| ... {len(diff) - 50} more | | | | |")
    return doc, "\n".join(lines) if diff else "online and offline lists agree for every user"
