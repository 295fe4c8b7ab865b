#!/usr/bin/env python3
"""Long reliability runs against real workers, Apache Kafka and PostgreSQL.

Each scenario starts ``recstream worker`` processes on a fresh PostgreSQL database and
fresh topics, sends events (with hostile records mixed in) while it injects faults, then
checks from the events log alone that every valid event was applied to state exactly
once, that each user's last recommendation is the offline model's top-K for its final
sequence, and that the dead-letter topic holds exactly the hostile records. It prints
one table row per scenario (``docs/reliability.md`` explains the columns).

    .venv/bin/python scripts/chaos.py all                # every scenario, defaults below
    .venv/bin/python scripts/chaos.py kill --kills 8     # one scenario, its own options
    .venv/bin/python scripts/chaos.py users --users 1000000 --json out.json

Scenarios: ``kill`` (two workers, SIGKILL one at random moments and restart it),
``broker`` (a one-node Kafka SIGKILLed mid-stream and restarted from its on-disk log),
``leader`` (three nodes, replication factor 3: the leader of the events partitions
SIGKILLed under load, restarted later), ``postgres`` (PostgreSQL stopped and started;
needs the local cluster and root), ``rebalance`` (add and remove workers under load),
``scale`` (one worker, then three, then one; the group's assignment read from the
coordinator), ``users`` (one event for each of N new users; peak RSS). Exit status 1
when any check of any scenario fails, a note included (a note is a broken promise:
records missing from the log, a commit ahead of its outputs, a worker that did not
stop cleanly, a fault that did not recover).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The harness is shared with the test suite (tests/integration/test_reliability.py).
sys.path.insert(0, str(ROOT))

from recstream_tools.kafka import KafkaCluster  # noqa: E402
from recstream_tools.postgres import LOCAL_ADMIN_URL, temporary_database  # noqa: E402
from stream_worker.store import run_migrations  # noqa: E402
from tests.integration import reliability_harness as rh  # noqa: E402
from tests.integration.worker_harness import TinyModel, publish_tiny_model  # noqa: E402

logger = logging.getLogger("chaos")


COLUMNS = (
    ("scenario", lambda r: r.scenario),
    ("events produced", lambda r: f"{r.produced:,}"),
    ("valid", lambda r: f"{r.valid:,}"),
    ("hostile", lambda r: f"{r.hostile:,}"),
    ("faults", lambda r: str(r.faults)),
    ("lost", lambda r: str(r.lost)),
    ("duplicated", lambda r: str(r.duplicated)),
    ("dead letters", lambda r: f"{r.dead_letters:,}" + (" exact" if r.dead_letters_exact else "")),
    ("re-published letters", lambda r: str(r.dead_letter_copies)),
    ("stale recs", lambda r: f"{r.recs_stale}/{r.recs_checked:,}"),
    ("recovery s (median / max)", lambda r: r.recovery_summary()),
    ("drain s", lambda r: f"{r.drain_s:.1f}"),
    ("peak RSS MiB", lambda r: f"{r.peak_rss_mb:,.0f}"),
    ("wall s", lambda r: f"{r.wall_s:.0f}"),
    ("ok", lambda r: "yes" if r.ok else "NO"),
)


def table(reports: list[rh.Report]) -> str:
    """A Markdown table, one row per report."""
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in reports]
    return "\n".join([head, rule, *rows])


class World:
    """What every scenario needs: a model, a broker (a one-node Apache Kafka cluster,
    shared), a PostgreSQL database per scenario. Broker faults get clusters of their own."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.model: TinyModel = publish_tiny_model(workdir / "artifacts")
        self.broker = KafkaCluster(workdir / "kafka", nodes=1).start()

    def close(self) -> None:
        self.broker.stop()

    def run(
        self,
        name: str,
        scenario: Callable[[rh.Chaos], rh.Report],
        *,
        bootstrap: str | None = None,
    ) -> rh.Report:
        logger.info("scenario %s: starting", name)
        with temporary_database(self.args.admin_url) as db_url:
            run_migrations(db_url)
            with rh.Chaos(
                bootstrap=bootstrap or self.broker.bootstrap_servers,
                db_url=db_url,
                model=self.model,
                workdir=self.workdir / name,
                name=name,
                session_timeout_s=self.args.session_timeout,
            ) as chaos:
                report = scenario(chaos)
        logger.info("scenario %s: %s", name, "ok" if report.ok else "FAILED")
        return report


def run_kill(world: World, args: argparse.Namespace) -> rh.Report:
    return world.run(
        "kill",
        lambda chaos: rh.kill_loop(
            chaos,
            kills=args.kills,
            rate=args.rate,
            users=args.users_pool,
            gap=(args.min_gap, args.max_gap),
            seed=args.seed,
        ),
    )


def run_broker(world: World, args: argparse.Namespace) -> rh.Report:
    with KafkaCluster(world.workdir / "kafka-restart", nodes=1) as cluster:
        return world.run(
            "broker",
            lambda chaos: rh.broker_restart(
                chaos,
                cluster,
                rate=args.rate,
                users=args.users_pool,
                down_s=args.outage,
                warmup=args.warmup,
                seed=args.seed,
            ),
            bootstrap=cluster.bootstrap_servers,
        )


def run_leader(world: World, args: argparse.Namespace) -> rh.Report:
    with KafkaCluster(world.workdir / "kafka-3", nodes=3) as cluster:

        def scenario(chaos: rh.Chaos) -> rh.Report:
            report, before, during = rh.leader_kill(
                chaos,
                cluster,
                rate=args.rate,
                users=args.users_pool,
                down_s=args.outage,
                warmup=args.warmup,
                seed=args.seed,
            )
            logger.info("events leaders before the kill %s, while down %s", before, during)
            return report

        return world.run("leader", scenario, bootstrap=cluster.bootstrap_servers)


def run_postgres(world: World, args: argparse.Namespace) -> rh.Report:
    if not rh.pg_cluster_available():
        raise SystemExit("error: the postgres scenario needs pg_ctlcluster (Debian's cluster)")
    commits: dict[str, dict[int, int]] = {}

    def scenario(chaos: rh.Chaos) -> rh.Report:
        report, during, before_restore = rh.postgres_outage(
            chaos,
            rate=args.rate,
            users=args.users_pool,
            outage=args.outage,
            warmup=args.warmup,
            seed=args.seed,
        )
        commits.update(during=during, before_restore=before_restore)
        if during != before_restore:
            report.notes.append(
                f"offsets committed during the outage: {during} -> {before_restore}"
            )
        return report

    report = world.run("postgres", scenario)
    # The database must be back for whatever runs next; postgres_outage restarted it.
    rh.wait_for_database(args.admin_url)
    logger.info("committed offsets during the outage: %s", json.dumps(commits))
    return report


def run_rebalance(world: World, args: argparse.Namespace) -> rh.Report:
    return world.run(
        "rebalance",
        lambda chaos: rh.rebalance(
            chaos, rate=args.rate, users=args.users_pool, hold=args.hold, seed=args.seed
        ),
    )


def run_scale(world: World, args: argparse.Namespace) -> rh.Report:
    def scenario(chaos: rh.Chaos) -> rh.Report:
        report, views = rh.scale(
            chaos, rate=args.rate, users=args.users_pool, hold=args.hold, seed=args.seed
        )
        shown = [{name: sorted(parts) for name, parts in view.items()} for view in views]
        logger.info("assignments (1 -> 3 -> 1 workers): %s", json.dumps(shown))
        if len(views[1]) != 3 or not all(views[1].values()):
            report.notes.append(f"three workers did not all get partitions: {shown[1]}")
        return report

    return world.run("scale", scenario)


def run_users(world: World, args: argparse.Namespace) -> rh.Report:
    return world.run(
        "users",
        lambda chaos: rh.many_users(chaos, users=args.users, timeout=args.timeout),
    )


SCENARIOS: dict[str, Callable[[World, argparse.Namespace], rh.Report]] = {
    "kill": run_kill,
    "broker": run_broker,
    "leader": run_leader,
    "postgres": run_postgres,
    "rebalance": run_rebalance,
    "scale": run_scale,
    "users": run_users,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("RECSTREAM_TEST_PG_ADMIN_URL", LOCAL_ADMIN_URL),
        help="PostgreSQL URL allowed to create databases (one per scenario is made and dropped)",
    )
    parser.add_argument("--rate", type=float, default=200, help="events/s during faults")
    parser.add_argument(
        "--users-pool", type=int, default=2000, help="users the events of kill/broker/... go to"
    )
    parser.add_argument("--session-timeout", type=float, default=10.0, help="worker setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=5, help="kill: SIGKILLs")
    parser.add_argument("--min-gap", type=float, default=4.0, help="kill: least seconds between")
    parser.add_argument("--max-gap", type=float, default=12.0, help="kill: most seconds between")
    parser.add_argument(
        "--outage", type=float, default=15.0, help="broker/leader/postgres: seconds down"
    )
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="broker/leader/postgres: load first"
    )
    parser.add_argument("--hold", type=float, default=8.0, help="rebalance/scale: seconds per step")
    parser.add_argument("--users", type=int, default=1_000_000, help="users: distinct users")
    parser.add_argument("--timeout", type=float, default=900, help="users: most seconds to drain")
    parser.add_argument("--json", type=Path, help="also write the reports as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("alembic", "stream_worker", "model"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The checker's own clients: connection errors during the broker outage are expected.
    for client in ("kafka", "aiokafka"):
        logging.getLogger(client).setLevel(logging.CRITICAL)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    with tempfile.TemporaryDirectory(prefix="recstream-chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        world = World(args, workdir)
        reports: list[rh.Report] = []
        try:
            for name in names:
                try:
                    reports.append(SCENARIOS[name](world, args))
                except Exception as exc:  # report it and go on with the next scenario
                    logger.exception("scenario %s crashed", name)
                    reports.append(rh.Report(name, notes=[f"crashed: {exc!r}"]))
        finally:
            world.close()
            if reports:
                print(table(reports))
                for report in reports:
                    for note in report.notes:
                        print(f"note ({report.scenario}): {note}")
            if args.json and reports:
                doc: list[dict[str, Any]] = [asdict(r) | {"ok": r.ok} for r in reports]
                args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
