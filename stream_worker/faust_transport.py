"""faust's aiokafka transport with a configurable fetch long-poll.

faust hard-codes ``fetch_max_wait_ms=1500`` for the worker consumer. Against a broker
that holds a multi-partition fetch until that deadline under steady load (tansu does;
measured: p50 ~400 ms from produce to consume at 200 events/s on 4 partitions, ~30 ms
with 100 ms), that wait becomes the worker's latency floor. Everything else is faust's.
"""

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

FAUST_DEFAULT_FETCH_MAX_WAIT_MS = 1500


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher.
        consumer._fetch_max_wait_ms = getattr(
            self.app, "fetch_max_wait_ms", FAUST_DEFAULT_FETCH_MAX_WAIT_MS
        )
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class App(faust.App):
    """A faust app whose worker consumer long-polls at most ``fetch_max_wait_ms``."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
