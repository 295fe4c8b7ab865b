"""Artifacts on a directory and on a real S3-compatible server (SeaweedFS), one contract:
train, build-index, versions, rollback and gc through the CLI on both; a broken or
incomplete version refused; a worker switching versions through the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from model.artifact_store import ArtifactStore, open_store
from model.errors import ArtifactError
from recstream_tools.kafka import KafkaCluster
from recstream_tools.probe import page
from recstream_tools.s3 import SeaweedS3
from stream_worker.produce import generated_log
from stream_worker.recommender import in_canary
from stream_worker.store import run_migrations
from tests.integration.worker_harness import (
    TINY_ENV,
    Reader,
    WorkerProcess,
    cli,
    new_topics,
    send,
    walk_events,
    worker_env,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["directory", "s3"])
def location(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, dict[str, str]]]:
    """(artifact root, environment) for a directory or for a fresh bucket."""
    env = dict(TINY_ENV)
    env["RECSTREAM_ARTIFACTS__CACHE_DIR"] = str(tmp_path / "cache")
    if request.param == "s3":
        s3: SeaweedS3 = request.getfixturevalue("s3")
        root = f"s3://{s3.new_bucket()}/models"
        env |= s3.env
    else:
        root = str(tmp_path / "artifacts")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield root, env


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "walks.txt"
    sequences = generated_log(users=60, items=40, length=25, seed=3)
    path.write_text("".join(f"{u} {i}\n" for u, items in sequences.items() for i in items))
    return path


def train(log_file: Path, root: str, epochs: int = 1) -> str:
    version: str = cli(
        "train", "--data", str(log_file), "--format", "sasrec", "--out", root,
        "--epochs", str(epochs), "--no-progress",
    )["version"]  # fmt: skip
    return version


def store_of(root: str, env: dict[str, str]) -> ArtifactStore:
    return open_store(root, endpoint_url=env.get("RECSTREAM_ARTIFACTS__ENDPOINT_URL"))


def test_train_build_index_rollback_and_gc_on_either_store(
    location: tuple[str, dict[str, str]], log_file: Path
) -> None:
    root, env = location
    first = train(log_file, root, epochs=2)
    listed = cli("versions", "--artifacts", root)
    assert [(v["version"], v["current"], v["complete"]) for v in listed["versions"]] == [
        (first, True, True)
    ]
    second = cli("build-index", "--artifacts", root, "--factory", "HNSW8")["version"]
    assert second != first
    assert cli("rollback", "--artifacts", root, "--to", first) == {
        "current": first, "previous": second,
    }  # fmt: skip
    third = cli("build-index", "--artifacts", root, "--factory", "Flat", "--no-switch")["version"]
    # The live one (first) and the newest (third) stay; second goes.
    assert cli("gc", "--artifacts", root, "--keep", "1")["deleted"] == [second]
    store = store_of(root, env)
    assert store.versions() == sorted([first, third]) and store.read_current() == first
    evaluated = cli(
        "evaluate",
        "--data",
        str(log_file),
        "--format",
        "sasrec",
        "--artifacts",
        root,
        "--no-progress",
    )
    assert 0 <= evaluated["ndcg@10"] <= 1


def test_a_broken_or_incomplete_version_never_becomes_current(
    location: tuple[str, dict[str, str]], log_file: Path, tmp_path: Path
) -> None:
    root, env = location
    live = train(log_file, root)
    spare = cli("build-index", "--artifacts", root, "--factory", "Flat", "--no-switch")["version"]
    store = store_of(root, env)
    # A file of the spare version changes after its manifest was written.
    local = tmp_path / "tampered"
    store.get_version(spare, local)
    (local / "items.json").write_text('["<pad>"]')
    store.delete_version(spare)
    store.put_version(local, spare)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        cli("rollback", "--artifacts", root, "--to", spare)
    # A version whose upload stopped before its manifest.
    (local / "manifest.json").unlink()
    half = f"{spare}-half"
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("encoder.pt", "items.json"):
        (partial / name).write_bytes((local / name).read_bytes())
    upload_files_only(store, partial, half)
    assert not store.complete(half)
    with pytest.raises(ArtifactError, match="not a complete version"):
        cli("rollback", "--artifacts", root, "--to", half)
    assert store.read_current() == live


def upload_files_only(store: ArtifactStore, local: Path, version: str) -> None:
    """What an upload cut short leaves: some files, no manifest."""
    from model.artifact_store import LocalStore, S3Store

    if isinstance(store, S3Store):
        for path in local.iterdir():
            store.client.upload_file(str(path), store.bucket, store._key(version, path.name))
    else:
        assert isinstance(store, LocalStore)
        target = store.root / version
        target.mkdir()
        for path in local.iterdir():
            (target / path.name).write_bytes(path.read_bytes())


def test_a_worker_switches_versions_through_the_bucket(
    broker: KafkaCluster, s3: SeaweedS3, log_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    root = f"s3://{s3.new_bucket()}/models"
    for key, value in {**TINY_ENV, **s3.env}.items():
        monkeypatch.setenv(key, value)
    first = train(log_file, root)
    topics = new_topics(broker.bootstrap_servers, "s3-")
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    cache = tmp_path / "worker-cache"
    env = worker_env(
        broker.bootstrap_servers, db_url, tmp_path / "unused", topics, tmp_path,
        RECSTREAM_ARTIFACTS__ROOT=root, RECSTREAM_ARTIFACTS__CACHE_DIR=str(cache),
        **s3.env,
    )  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    port = int(env["RECSTREAM_WORKER__WEB_PORT"])
    try:
        assert page(port, "/ready")[1]["index_version"] == first
        second = cli("build-index", "--artifacts", root, "--factory", "HNSW8")["version"]
        # The worker downloads and verifies the new version in the background and swaps
        # it in between batches: events keep coming until an answer comes from it.
        with Reader(broker.bootstrap_servers, topics["recommendations"]) as reader:
            deadline = time.monotonic() + 60
            wave = 0
            while not any(v["index_version"] == second for v in reader.values):
                assert time.monotonic() < deadline, worker.log()[-3000:]
                send(broker.bootstrap_servers, topics["events"], walk_events(f"s3{wave}", 2, 1))
                reader.read_until(lambda vs, n=len(reader.values): len(vs) > n, timeout=5)
                wave += 1
            swapped = next(i for i, v in enumerate(reader.values) if v["index_version"] == second)
        later = reader.values[swapped:]
        assert {v["index_version"] for v in later} == {second}
        assert {v["model_version"] for v in later} == {first}  # the same model, a new index
        assert {v["index_version"] for v in reader.values[:swapped]} <= {first}
        assert page(port, "/ready")[1]["index_version"] == second
        # The worker's local cache holds both versions, verified.
        assert {p.name for p in cache.iterdir() if not p.name.startswith(".")} == {first, second}
    finally:
        assert worker.stop() == 0


def test_a_canary_starts_shows_is_kept_by_gc_and_is_promoted_on_either_store(
    location: tuple[str, dict[str, str]], log_file: Path
) -> None:
    root, env = location
    old = train(log_file, root)
    live = cli("build-index", "--artifacts", root, "--factory", "Flat")["version"]
    candidate = cli("build-index", "--artifacts", root, "--factory", "HNSW8", "--no-switch")[
        "version"
    ]
    assert cli("canary", "--artifacts", root) == {"current": live, "canary": None}
    started = cli("canary", "--artifacts", root, "--version", candidate, "--share", "0.1")
    assert started == {"current": live, "canary": {"version": candidate, "share": 0.1}}
    shown = {
        v["version"]: v["canary_share"] for v in cli("versions", "--artifacts", root)["versions"]
    }
    assert shown == {old: None, live: None, candidate: 0.1}
    # gc keeps the live version and the canary even when neither is among the newest.
    newest = cli("build-index", "--artifacts", root, "--factory", "Flat", "--no-switch")["version"]
    assert cli("gc", "--artifacts", root, "--keep", "1")["deleted"] == [old]
    assert store_of(root, env).versions() == sorted([live, candidate, newest])
    assert cli("promote", "--artifacts", root) == {"current": candidate, "previous": live}
    assert cli("canary", "--artifacts", root) == {"current": candidate, "canary": None}
    cli("canary", "--artifacts", root, "--version", live, "--share", "0.5")
    assert cli("canary", "--artifacts", root, "--stop") == {"canary": None, "stopped": live}
    assert store_of(root, env).read_current() == candidate


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "{live}", "--share", "0.1"], "already the live version"),
        (["--version", "nope", "--share", "0.1"], "no version 'nope'"),
        (["--version", "{live}", "--share", "1.5"], "between 0 and 1"),
        (["--version", "{live}"], "needs both --version V and --share P"),
        (["--stop", "--share", "0.1"], "--stop takes neither"),
    ],
)
def test_a_bad_canary_request_is_one_error_line(
    args: list[str], message: str, log_file: Path, tmp_path: Path
) -> None:
    root = str(tmp_path / "artifacts")
    live = train(log_file, root)
    done = subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", "canary", "--artifacts", root,
         *(a.format(live=live) for a in args)],
        capture_output=True, text=True, check=False, env={**os.environ, **TINY_ENV},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert open_store(root).read_canary() is None


def test_a_worker_serves_a_canary_to_its_share_through_the_bucket_then_follows_promote(
    broker: KafkaCluster, s3: SeaweedS3, log_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """`recstream canary`, `promote` and `canary --stop` against a running worker on
    Apache Kafka, versions in a real bucket: each user's recommendations come from the
    version its hash share names, both versions are scored online, and after promote
    every user gets the new version."""
    root = f"s3://{s3.new_bucket()}/models"
    for key, value in {**TINY_ENV, **s3.env}.items():
        monkeypatch.setenv(key, value)
    live = train(log_file, root)
    candidate = train(log_file, root, epochs=2)  # a second model; CURRENT moved to it
    cli("rollback", "--artifacts", root, "--to", live)
    topics = new_topics(broker.bootstrap_servers, "canary-")
    db_url = f"sqlite:///{tmp_path / 'state.db'}"
    run_migrations(db_url)
    env = worker_env(
        broker.bootstrap_servers, db_url, tmp_path / "unused", topics, tmp_path,
        RECSTREAM_ARTIFACTS__ROOT=root, RECSTREAM_ARTIFACTS__CACHE_DIR=str(tmp_path / "cache"),
        **s3.env,
    )  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    port = int(env["RECSTREAM_WORKER__WEB_PORT"])

    def serving_becomes(check: Any) -> dict[str, Any]:
        """Until /ready shows ``check``: new versions are taken up between batches, so
        clicks of new users (never scored online: they had no list) are sent meanwhile."""
        deadline = time.monotonic() + 60
        while not check(body := page(port, "/ready")[1]):
            assert time.monotonic() < deadline, (body, worker.log()[-3000:])
            nudge = f"nudge-{uuid.uuid4().hex}"
            send(broker.bootstrap_servers, topics["events"], [(nudge, nudge, "item-1")])
            time.sleep(0.3)
        return dict(body)

    def wave(name: str, users: int) -> dict[str, dict[str, Any]]:
        """One click for each of users 0..users-1; returns their recommendations."""
        clicks = [(f"{name}-{n}", f"user-{n}", f"item-{(n * 7 + len(name)) % 40}")
                  for n in range(users)]  # fmt: skip
        ids = set(send(broker.bootstrap_servers, topics["events"], clicks))
        with Reader(broker.bootstrap_servers, topics["recommendations"]) as reader:
            reader.read_until(lambda vs: ids <= {v["source_event_id"] for v in vs})
        answers = {v["user_id"]: v for v in reader.values if v["source_event_id"] in ids}
        assert len(answers) == users, worker.log()[-3000:]
        return answers

    try:
        cli("canary", "--artifacts", root, "--version", candidate, "--share", "0.5")
        body = serving_becomes(lambda b: "canary" in b)
        assert body["canary"] == {"version": candidate, "model_version": candidate, "share": 0.5}
        assert body["version"] == live
        # The worker's local cache of the bucket holds both versions it serves.
        cached = {p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")}
        assert {live, candidate} <= cached
        answers = wave("c", 40)
        for user, rec in answers.items():
            assert rec["model_version"] == (candidate if in_canary(user, candidate, 0.5) else live)
        assert {rec["model_version"] for rec in answers.values()} == {live, candidate}
        # The same users' next clicks: each scored against the version that answered.
        wave("cc", 40)
        metrics = page(port, "/metrics")[1]
        for version in (live, candidate):
            users = sum(rec["model_version"] == version for rec in answers.values())
            assert f'recstream_online_scored_total{{model_version="{version}"}} {users}.0' in (
                metrics
            )
        assert (
            f'recstream_canary_share{{model_version="{candidate}",version="{candidate}"}} 0.5'
            in (metrics)
        )
        # `recstream report` draws both versions' online HR@10 from the same page.
        png = tmp_path / "online.png"
        drawn = cli("report", "--url", f"http://127.0.0.1:{port}/metrics", "--duration", "1",
                    "--every", "0.5", "--out", str(png))  # fmt: skip
        assert set(drawn["online_hr@10"]) == {live, candidate}
        assert png.read_bytes().startswith(b"\x89PNG")
        # The judge reads the same page: not enough events for a verdict yet, then, with
        # any gap allowed, a promotion it carries out.
        url = f"http://127.0.0.1:{port}/metrics"
        waiting = cli("canary-judge", "--artifacts", root, "--metrics", url,
                      "--min-scored", "100000")  # fmt: skip
        assert waiting["decision"] == "wait" and not waiting["applied"]
        assert waiting["live_scored"] + waiting["canary_scored"] == 40
        judged = cli("canary-judge", "--artifacts", root, "--metrics", url, "--min-scored", "1",
                     "--margin", "1", "--apply")  # fmt: skip
        assert judged["decision"] == "promote" and judged["applied"]
        assert store_of(root, s3.env).read_current() == candidate
        serving_becomes(lambda b: b["version"] == candidate and "canary" not in b)
        assert {rec["model_version"] for rec in wave("p", 20).values()} == {candidate}
        cli("canary", "--artifacts", root, "--version", live, "--share", "0.5")
        serving_becomes(lambda b: "canary" in b)
        cli("canary", "--artifacts", root, "--stop")
        serving_becomes(lambda b: "canary" not in b)
        assert {rec["model_version"] for rec in wave("s", 20).values()} == {candidate}
        assert "recstream_canary_share{" not in page(port, "/metrics")[1]
    finally:
        assert worker.stop() == 0
