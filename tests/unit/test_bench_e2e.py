"""Pure parts of the end-to-end benchmark: latency attribution, metrics, tables."""

import gc
import math
import os
import threading
import time
import warnings

import numpy as np

from recstream_tools.bench.e2e import (
    BareResult,
    CpuSampler,
    cores_per_interval,
    event_latencies,
    first_and_last_third,
    format_cpu,
    format_drift,
    format_loads,
    format_stages,
    full_gc_pauses,
    log_time_ms,
    proc_cpu_seconds,
    stage_means,
    summarise,
)
from stream_worker.metrics import WorkerMetrics


def test_an_answer_covers_the_users_earlier_events_and_no_one_elses() -> None:
    users = ["a", "b", "a", "a", "b"]
    sent = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    # "a" is answered once for event 2 (covering 0 and 2), then for event 3; "b" only
    # for event 1, so its event 4 stays unanswered.
    latencies = event_latencies(users, sent, [(2, 10.0), (1, 11.0), (3, 20.0)])
    assert latencies[:4].tolist() == [10.0, 10.0, 8.0, 17.0]
    assert math.isnan(latencies[4])


def test_a_late_answer_for_an_older_event_does_not_uncover_newer_ones() -> None:
    latencies = event_latencies(["a", "a"], np.array([0.0, 5.0]), [(1, 9.0), (0, 30.0)])
    assert latencies.tolist() == [9.0, 4.0]


def test_stage_means_read_the_workers_own_metrics() -> None:
    metrics = WorkerMetrics()
    for size, encode in ((100, 4.0), (300, 8.0)):
        metrics.batch_size.observe(size)
        metrics.stage_ms.labels("encode").observe(encode)
        metrics.stage_ms.labels("db").observe(1.0)
    batches, mean_batch, stages = stage_means(metrics.exposition().decode())
    assert (batches, mean_batch) == (2, 200.0)
    assert stages == {"db": 1.0, "encode": 6.0}


def test_summary_and_tables() -> None:
    latencies = np.array([5.0, 10.0, 15.0, np.nan])
    to_publish = latencies - 2.0
    published = np.array([700.0, 1500.0])
    result = summarise("taobao", 2000, latencies, to_publish, 0.0, published)
    assert (result.events, result.answered, result.events_per_s) == (4, 3, 2.0)
    assert (result.outputs, result.outputs_per_s) == (2, 1.3)
    assert result.p50_ms == 10.0
    assert (result.publish_p50_ms, result.publish_p99_ms) == (8.0, 12.9)
    result.stage_ms = {"db": 1.0, "encode": 3.0}
    result.sent_per_s = 1990.0  # the producer fell a little behind the offered load
    bare = BareResult("bare aiokafka loop (kafka, taobao)", 10, 1.0, 10.0, "kafka", "taobao")
    loads = format_loads([result], [bare])
    assert "| kafka, sqlite | taobao | 2,000 | 1,990 | 3/4 | 2 | 1 | 20% |" in loads
    assert "Above the bare loop" not in loads
    assert "| 8.0 / 12.9 |" in loads
    assert "75%" in format_stages([result])  # encode's share of the batch time


def test_cpu_seconds_are_read_past_a_command_name_with_spaces_and_parentheses() -> None:
    stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 3 0"
    assert proc_cpu_seconds(stat, 100.0) == 3.0  # (250 + 50) ticks at 100 per second


def test_a_burst_of_equal_receive_times_does_not_inflate_the_rate() -> None:
    """The collector may read every answer of a preloaded replay in one poll: the rate
    comes from the worker's time (its assignment to its last publish), not from the
    receive times, whose span is then zero."""
    events = 40_000
    sent = np.zeros(events)  # preloaded before the worker joined
    users = [f"u{i % 500}" for i in range(events)]
    burst = 9_000.0  # every answer received in the same millisecond
    answered = list(range(events - 500, events))  # each user's last event
    latencies = event_latencies(users, sent, [(i, burst) for i in answered])
    published = np.linspace(2_000.0, 8_000.0, len(answered))  # 6 s of publishing
    to_publish = event_latencies(users, sent, list(zip(answered, published, strict=True)))
    result = summarise("ml-1m", 0, latencies, to_publish, 1_000.0, published)
    assert result.answered == events
    assert result.seconds == 7.0  # assignment at 1 s -> last publish at 8 s
    assert result.events_per_s == round(events / 7.0, 1)
    assert result.outputs_per_s == round(500 / 7.0, 1)


def test_a_ratio_above_the_bare_loop_is_explained_with_outputs_per_second() -> None:
    result = summarise("ml-1m", 0, np.ones(300), np.ones(300), 0.0, np.array([100.0, 1000.0]))
    bare = BareResult("bare aiokafka loop (kafka, ml-1m)", 200, 1.0, 200.0, "kafka", "ml-1m")
    loads = format_loads([result], [bare])
    assert "| 300 | 2 | 150% |" in loads
    assert "Above the bare loop (kafka, sqlite, ml-1m, unthrottled)" in loads
    assert "2 outputs/s for 300 events/s" in loads


def test_the_start_of_the_workers_window_is_its_log_lines_time() -> None:
    log = (
        "2026-12-06 09:05:33,249 INFO stream_worker.service: worker ready\n"
        '2026-12-06 09:05:34,512 INFO stream_worker.app: partitions assigned: ["e/0"]\n'
    )
    first = log_time_ms(log, "worker ready")
    assigned = log_time_ms(log, "partitions assigned")
    assert first is not None and assigned is not None
    assert assigned - first == 1263.0
    assert log_time_ms(log, "never logged") is None


def test_cpu_table_sums_the_processes() -> None:
    result = summarise("ml-1m", 0, np.array([1.0]), np.array([1.0]), 0.0, np.array([1.0]))
    result.cpu_cores = {"worker": 0.9, "broker": 0.4, "producer": 0.0, "collector": 0.2}
    result.full_gcs, result.full_gc_ms = 2, 301.0
    table = format_cpu([result])
    assert (
        "| kafka, sqlite | ml-1m | unthrottled | 0.90 | 0.40 | 0.00 | 0.20 | 1.50 | 2 (301) |"
        in table
    )


def test_drift_compares_the_first_and_last_third_of_throttled_replays() -> None:
    to_publish = np.array([10.0, 10.0, 20.0, 20.0, 90.0, np.nan])
    result = summarise("taobao", 2000, to_publish + 5, to_publish, 0.0, np.array([1.0]))
    assert result.publish_p99_by_third == [10.0, 20.0, 90.0]
    result.cpu_timeline = {
        "worker": [0.7, 0.7, 0.7, 0.7, 0.7, 0.7],
        "broker": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    }
    unthrottled = summarise("taobao", 0, to_publish, to_publish, 0.0, np.array([1.0]))
    table = format_drift([result, unthrottled])
    assert (
        "| kafka, sqlite | taobao | 2,000 | 0.70 -> 0.70 | 0.25 -> 0.65 | 10.0 -> 90.0 |" in table
    )
    assert "unthrottled" not in table  # its latency is queueing, not a figure of merit


def test_cores_per_interval_divide_cpu_by_wall_time() -> None:
    readings = [(0.0, 10.0), (1.0, 10.5), (3.0, 12.5), (3.0, 12.5)]
    assert cores_per_interval(readings)[:2] == [0.5, 1.0]
    assert math.isnan(cores_per_interval(readings)[2])  # no wall time: no figure
    assert cores_per_interval(readings[:1]) == []


def test_first_and_last_third_need_three_samples() -> None:
    assert first_and_last_third([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == (1.5, 6.5)
    assert all(math.isnan(v) for v in first_and_last_third([1.0, 2.0]))


def test_the_sampler_sees_a_busy_thread_and_not_an_idle_process() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    sampler = CpuSampler({"me": os.getpid(), "gone": None}, interval_s=0.1)
    busy = threading.Thread(target=spin)
    busy.start()
    sampler.start()
    time.sleep(0.6)
    stop.set()
    busy.join()
    time.sleep(0.5)
    sampler.stop()
    timeline = sampler.timeline()
    assert list(timeline) == ["me"]  # an external broker has no pid to read
    cores = [c for c in timeline["me"] if not math.isnan(c)]
    assert max(cores) > 0.4  # the spinning thread holds most of a core
    assert min(cores) < 0.2  # and nothing is spent once it stopped


def test_full_collections_are_recorded_apart_from_young_ones() -> None:
    # A full collection also finalises what earlier tests left behind: kafka-python
    # does not close the socket of a refused connection attempt (a broker stopped or
    # not yet listening), and collecting it warns. Collect that garbage first, outside
    # what this test measures, so that its warning is not charged to this test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    metrics = WorkerMetrics()
    stop = metrics.watch_gc()
    try:
        gc.collect(0)
        gc.collect()
        gc.collect()
    finally:
        stop()
    gc.collect()  # not recorded any more
    count, total_ms = full_gc_pauses(metrics.exposition().decode())
    assert count == 2 and total_ms > 0
