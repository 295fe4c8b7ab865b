"""The ``recstream`` command line.

Settings are built once here and passed inward. Every operator-facing failure
(:class:`RecstreamError`, invalid settings) is printed as one ``error:`` line with exit
status 2; tracebacks are reserved for bugs.
"""

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from model.config import IndexConfig
from model.errors import ArtifactError, ConfigError, RecstreamError
from stream_worker.settings import Settings

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="recstream",
    help="Streaming, real-time sequential recommendations (SASRec + FAISS over Kafka).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def load_settings() -> Settings:
    """Build the settings once per command and configure logging from them."""
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "__".join(str(p) for p in first["loc"]).upper()
        raise ConfigError(f"invalid setting RECSTREAM_{where}: {first['msg']}") from None
    configure_logging(settings.log_level)
    return settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":
        # Client libraries log every connection and rebalance at INFO.
        for noisy in ("faiss.loader", "kafka", "aiokafka", "faust", "mode", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _tool(module: str) -> Any:
    """A module of the development tools (demo, benchmarks): the recstream-tools package,
    which the worker's image does not install."""
    try:
        return importlib.import_module(f"recstream_tools.{module}")
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("recstream_tools"):
            raise
        raise ConfigError(
            "this command needs recstream's development tools, which the worker image "
            "does not ship: run it from a clone with scripts/run (or pip install ./tools)"
        ) from None


def _store(settings: Settings, location: str | None = None) -> Any:
    """The artifact store at ``location`` (default RECSTREAM_ARTIFACTS__ROOT)."""
    from model.artifact_store import open_store

    return open_store(
        location or settings.artifacts.root, endpoint_url=settings.artifacts.endpoint_url
    )


def _columns(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    pairs = [part.split("=", 1) for part in spec.split(",") if part]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise ConfigError(f"--columns must look like user=COL,item=COL[,ts=COL,type=COL]: {spec!r}")
    return {k.strip(): v.strip() for k, v in pairs}


DataOpt = Annotated[
    Path,
    typer.Option("--data", help="Interaction log file.", exists=True, dir_okay=False),
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="Data format; detected from the file when omitted.")
]


ItemsOpt = Annotated[
    Path | None,
    typer.Option(
        "--items", help="Item texts: JSON lines, CSV or a RecBole .item file (id + text fields)."
    ),
]
ProtocolOpt = Annotated[
    str,
    typer.Option(
        help="leave-one-out, or cold-items: items first seen in the last 10% of the time "
        "span are withheld from training and are the test targets.",
    ),
]
PROTOCOLS = ("leave-one-out", "cold-items")


def _protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown --protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return name


@app.command()
def train(
    data: DataOpt,
    out: Annotated[
        str, typer.Option("--out", help="Artifact root to publish into: a directory or s3://.")
    ],
    fmt: FormatOpt = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Most epochs to train.")] = None,
    columns: Annotated[
        str | None, typer.Option(help="Column mapping for csv/parquet: user=COL,item=COL,...")
    ] = None,
    factory: Annotated[
        str | None, typer.Option(help="FAISS factory string (default: exact 'Flat').")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    items: ItemsOpt = None,
    protocol: ProtocolOpt = "leave-one-out",
) -> None:
    """Train SASRec on a log file and publish a servable version (switches CURRENT).
    With --items, a text tower too, so `recstream add-items` can add items later."""
    from model.artifact_store import workspace
    from model.data import build_sequence_data, load_interactions
    from model.evaluate import format_table
    from model.item_text import load_item_texts
    from model.pipeline import fingerprint, train_and_publish

    settings = load_settings()
    cfg = settings.train.model_copy(update={"epochs": epochs} if epochs else {})
    index_cfg = settings.index.model_copy(update={"factory": factory} if factory else {})
    texts = load_item_texts(items) if items else None
    protocol = _protocol(protocol)
    log = load_interactions(data, fmt, _columns(columns))
    info = fingerprint(log)
    sequences = log.sequences()
    types = None
    if cfg.event_types == "on":
        if not log.has_event_types():
            raise ConfigError(f"RECSTREAM_TRAIN__EVENT_TYPES is on, but every event in {data} "
                              "has one type")  # fmt: skip
        if protocol == "cold-items":
            raise ConfigError("the cold-items protocol trains without event types")
        types = log.event_types()
    if protocol == "cold-items":
        from model.cold_items import FRACTION, cold_split, without

        split = cold_split(log, FRACTION)
        sequences = without(sequences, split.cold)
        info["protocol"] = split.info(FRACTION)
        typer.echo(f"cold-items protocol: {len(split.cold)} items withheld from training", err=True)
    with workspace(_store(settings, out)) as root:
        published = train_and_publish(
            build_sequence_data(sequences, event_types=types), info, root, cfg, index_cfg,
            progress=progress,
            item_texts=texts,
        )  # fmt: skip
    r = published.result
    typer.echo(
        format_table({"sasrec (test)": r.test, "popularity (test)": r.popularity_test}), err=True
    )
    typer.echo(
        f"published {published.version} under {out} (best epoch {r.best_epoch}, "
        f"{r.wall_s:.0f}s, peak RSS {r.peak_rss_mb:.0f} MiB)",
        err=True,
    )
    typer.echo(json.dumps({"version": published.version, **r.test}))


@app.command()
def evaluate(
    data: DataOpt,
    artifacts: Annotated[
        str, typer.Option("--artifacts", help="Artifact root, a directory or s3:// (uses CURRENT).")
    ],
    fmt: FormatOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    items: ItemsOpt = None,
    protocol: ProtocolOpt = "leave-one-out",
) -> None:
    """Leave-one-out, full-ranking HR@K/NDCG@K of the live version and of popularity;
    --protocol cold-items (with --items): on targets the version was never trained on."""
    from model.artifact_store import CURRENT, workspace
    from model.evaluate import format_table
    from model.pipeline import evaluate_published

    settings = load_settings()
    if _protocol(protocol) == "cold-items":
        from model.artifacts import load_version
        from model.cold_items import evaluate_cold
        from model.data import load_interactions
        from model.item_text import load_item_texts

        if items is None:
            raise ConfigError("--protocol cold-items needs --items FILE (the items' texts)")
        texts = load_item_texts(items)
        log = load_interactions(data, fmt)
        with workspace(_store(settings, artifacts), pull=[CURRENT]) as root:
            cold = evaluate_cold(log, load_version(root), root, texts)
        typer.echo(json.dumps(cold))
        return
    with workspace(_store(settings, artifacts), pull=[CURRENT]) as root:
        result = evaluate_published(data, root, fmt, progress=progress)
    typer.echo(format_table({"sasrec": result.model, "popularity": result.popularity}), err=True)
    typer.echo(json.dumps(result.as_json()))


@app.command("replay-eval")
def replay_eval(
    data: DataOpt,
    artifacts: Annotated[
        str | None,
        typer.Option("--artifacts", help="Artifact root (default: RECSTREAM_ARTIFACTS__ROOT)."),
    ] = None,
    fmt: FormatOpt = None,
    users: Annotated[
        int | None, typer.Option(min=1, help="Replay the first N users (default: all).")
    ] = None,
    local: Annotated[
        bool,
        typer.Option(
            help="Run a broker and a worker of its own, like `recstream demo`; otherwise "
            "use the configured deployment's topics (under fresh user ids)."
        ),
    ] = False,
    broker: Annotated[str, typer.Option(help="With --local: tansu or kafka.")] = "tansu",
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for answers.")] = 600,
) -> None:
    """Online against offline: each user's history without its last item through the real
    path, the recommendation after its last event scored against the held-out item, beside
    the same version's offline top 10 for the same users. One JSON line, and a table of
    the users whose lists differ."""
    import tempfile

    from model.artifact_store import CURRENT, workspace
    from model.artifacts import load_version
    from model.data import load_interactions
    from stream_worker.kafka_config import check_connection, kafka_python_options
    from stream_worker.replay_eval import offline_answers, plan, report, run_replay

    settings = load_settings()
    log = load_interactions(data, fmt)
    chosen = plan(log.sequences(), users, log.event_types())
    topics = (settings.topics.events, settings.topics.recommendations)
    with workspace(_store(settings, artifacts), pull=[CURRENT]) as root:
        loaded = load_version(root)
        offline = offline_answers(loaded, chosen)
        if local:
            local_worker = _tool("demo").local_worker
            with (
                tempfile.TemporaryDirectory(prefix="recstream-replay-") as tmp,
                local_worker(Path(tmp), root, broker) as run,
            ):
                options = {"bootstrap_servers": run.bootstrap}
                online = run_replay(options, options, topics, chosen, timeout_s=timeout)
        else:
            check_connection(settings.kafka)
            options = kafka_python_options(settings.kafka)
            online = run_replay(options, options, topics, chosen, timeout_s=timeout)
    doc, table = report(chosen, online, offline, loaded.version, settings.worker.history_length)
    typer.echo(table, err=True)
    typer.echo(json.dumps(doc))


@app.command("build-index")
def build_index(
    artifacts: Annotated[
        str | None,
        typer.Option("--artifacts", help="Artifact root (default: RECSTREAM_ARTIFACTS__ROOT)."),
    ] = None,
    factory: Annotated[
        str | None, typer.Option(help="FAISS factory string, e.g. Flat, IVF256,Flat.")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Source version (default: the one CURRENT names).")
    ] = None,
    nprobe: Annotated[int | None, typer.Option(min=1, help="IVF lists probed per query.")] = None,
    ef_search: Annotated[int | None, typer.Option(min=1, help="HNSW efSearch.")] = None,
    switch: Annotated[bool, typer.Option(help="Point CURRENT at the new version.")] = True,
) -> None:
    """Rebuild the FAISS index of a version as a new version (model unchanged)."""
    from model.artifact_store import workspace
    from model.artifacts import read_manifest, rebuild_index

    settings = load_settings()
    updates: dict[str, Any] = {"factory": factory or settings.index.factory}
    if nprobe:
        updates["nprobe"] = nprobe
    if ef_search:
        updates["ef_search"] = ef_search
    cfg: IndexConfig = settings.index.model_copy(update=updates)
    store = _store(settings, artifacts)
    source = version or store.read_current()
    with workspace(store, pull=[source]) as root:
        new = rebuild_index(root, source, cfg, switch=switch)
        manifest = read_manifest(root / new)
    typer.echo(json.dumps({"version": new, "source": source, "index": manifest["index"]}))


ArtifactsRootOpt = Annotated[
    str | None,
    typer.Option(
        "--artifacts",
        help="Artifact root, a directory or s3:// (default: RECSTREAM_ARTIFACTS__ROOT).",
    ),
]


@app.command("add-items")
def add_items(
    items: Annotated[
        Path, typer.Option("--items", help="JSON lines or CSV: item id and text fields.")
    ],
    artifacts: ArtifactsRootOpt = None,
    version: Annotated[
        str | None, typer.Option(help="Source version (default: the one CURRENT names).")
    ] = None,
    switch: Annotated[bool, typer.Option(help="Point CURRENT at the new version.")] = True,
) -> None:
    """Publish a version that knows new items, placed from their text by the version's
    text tower (no retraining); workers recommend them and use them in histories."""
    from model.artifact_store import workspace
    from model.item_text import add_items as add
    from model.item_text import load_item_texts

    settings = load_settings()
    texts = load_item_texts(items)
    store = _store(settings, artifacts)
    source = version or store.read_current()
    with workspace(store, pull=[source]) as root:
        added = add(root, texts, source=source, switch=switch)
    typer.echo(
        json.dumps({"version": added.version, "source": added.source, "added": len(added.added),
                    "already_known": added.already_known})
    )  # fmt: skip


@app.command()
def retrain(
    artifacts: ArtifactsRootOpt = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Most epochs to train.")] = None,
    factory: Annotated[
        str | None, typer.Option(help="FAISS factory string (default: RECSTREAM_INDEX__FACTORY).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = False,
    items: ItemsOpt = None,
) -> None:
    """The periodic job: train on the worker's database, gate on quality, publish, switch.
    With --items, the new version gets a text tower, so add-items keeps working.

    Trains on every user's sequence in RECSTREAM_DATABASE__URL
    (RECSTREAM_TRAIN__*), scores the live version on the same validation
    data, and publishes and switches CURRENT only if the new validation
    NDCG@10 is not worse by more than RECSTREAM_RETRAIN__QUALITY_MARGIN
    (exit 3 otherwise). One run at a time per artifact root: a second run
    exits 2 at once, or waits RECSTREAM_RETRAIN__LOCK_TIMEOUT_S seconds.
    Prints one JSON line.
    """
    from model.artifact_store import CURRENT, workspace
    from model.errors import QualityGateRefused
    from model.item_text import load_item_texts
    from model.retrain import run_retrain
    from stream_worker.store import check_migrated, iter_histories, make_engine, redacted

    settings = load_settings()
    store = _store(settings, artifacts)
    cfg = settings.train.model_copy(update={"epochs": epochs} if epochs else {})
    index_cfg = settings.index.model_copy(update={"factory": factory} if factory else {})
    url = settings.database.url.get_secret_value()
    engine = make_engine(url, pool_size=1)

    types: dict[str, str] = {}

    def load() -> dict[str, list[str]]:
        check_migrated(engine)
        sequences = {}
        for user, items, codes in iter_histories(engine):
            sequences[user] = items
            types[user] = codes
        return sequences

    try:
        with workspace(store, pull=[CURRENT]) as root:
            outcome = run_retrain(
                root,
                load,
                {"source": redacted(url), "table": "user_sequences"},
                cfg,
                index_cfg,
                quality_margin=settings.retrain.quality_margin,
                min_users=settings.retrain.min_users,
                lock_timeout_s=settings.retrain.lock_timeout_s,
                progress=progress,
                item_texts=load_item_texts(items) if items else None,
                load_types=lambda: types,  # filled by load, which run_retrain calls first
            )
    finally:
        engine.dispose()
    typer.echo(json.dumps(outcome.as_json()))
    if not outcome.published:
        raise QualityGateRefused(
            f"quality gate: {outcome.decision.reason} (live version {outcome.live_version}, "
            "same validation data): nothing published, CURRENT unchanged"
        )
    if outcome.switched:
        typer.echo(f"published {outcome.version} and switched CURRENT", err=True)
    else:
        typer.echo(
            f"published {outcome.version}; CURRENT was changed by someone else during the "
            "run and was left as it is",
            err=True,
        )


@app.command()
def versions(artifacts: ArtifactsRootOpt = None) -> None:
    """List the versions under the artifact root, oldest first; * marks CURRENT, ~ the
    canary."""
    from model.artifact_store import summaries as version_summaries

    settings = load_settings()
    store = _store(settings, artifacts)
    summaries = version_summaries(store)
    if not summaries:
        raise ArtifactError(f"no versions under {store.url}")

    def fmt(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value or "-")

    lines = [f"  {'version':<24} {'created':<26} {'model':<24} {'index':<14} valid_ndcg@10"]
    for s in summaries:
        mark = "*" if s["current"] else ("~" if s.get("canary_share") else " ")
        if not s["complete"]:
            lines.append(f"{mark} {s['version']:<24} incomplete: {s['error']}")
            continue
        lines.append(
            f"{mark} {s['version']:<24} {fmt(s['created']):<26} {fmt(s['model_version']):<24} "
            f"{fmt(s['index']):<14} {fmt(s['valid_ndcg@10'])}"
        )
    typer.echo("\n".join(lines), err=True)
    typer.echo(json.dumps({"root": store.url, "versions": summaries}))


@app.command()
def rollback(
    to: Annotated[str, typer.Option("--to", help="Version to serve (see `recstream versions`).")],
    artifacts: ArtifactsRootOpt = None,
) -> None:
    """Point CURRENT at another existing version (verified first); workers follow it."""
    from model.artifact_store import switch

    settings = load_settings()
    previous = switch(_store(settings, artifacts), to, settings.artifacts.cache_dir)
    typer.echo(json.dumps({"current": to, "previous": previous}))


@app.command()
def canary(
    version: Annotated[
        str | None, typer.Option("--version", help="Version to serve to a share of users.")
    ] = None,
    share: Annotated[
        float | None,
        typer.Option(help="Fraction of users it serves, between 0 and 1 (0.05: 5%)."),
    ] = None,
    stop: Annotated[bool, typer.Option("--stop", help="End the canary.")] = False,
    artifacts: ArtifactsRootOpt = None,
) -> None:
    """Serve VERSION to a stable share of users beside CURRENT (workers follow within
    ARTIFACTS__POLL_INTERVAL_S); --stop ends it; with no option, show it."""
    from model.artifact_store import start_canary, stop_canary

    settings = load_settings()
    store = _store(settings, artifacts)
    if stop:
        if version is not None or share is not None:
            raise ConfigError("--stop takes neither --version nor --share")
        ended = stop_canary(store)
        typer.echo(json.dumps({"canary": None, "stopped": ended and ended.version}))
        return
    if version is None and share is None:
        running = store.read_canary()
        shown = None if running is None else {"version": running.version, "share": running.share}
        typer.echo(json.dumps({"current": store.read_current(), "canary": shown}))
        return
    if version is None or share is None:
        raise ConfigError("a canary needs both --version V and --share P (or --stop)")
    started = start_canary(store, version, share, settings.artifacts.cache_dir)
    typer.echo(
        json.dumps(
            {
                "current": store.read_current(),
                "canary": {"version": started.version, "share": started.share},
            }
        )
    )


@app.command("canary-judge")
def canary_judge(
    metrics: Annotated[
        list[str], typer.Option("--metrics", help="A worker's metrics page URL (repeat: all).")
    ],
    min_scored: Annotated[
        int, typer.Option(min=1, help="Scored events each version needs first.")
    ] = 1000,
    margin: Annotated[
        float, typer.Option(min=0.0, help="How far below live its online NDCG@10 may be.")
    ] = 0.005,
    apply: Annotated[bool, typer.Option(help="Promote or stop, as decided.")] = False,
    artifacts: ArtifactsRootOpt = None,
) -> None:
    """Decide the running canary from the workers' online NDCG@10: promote, stop or wait
    (exit 0 in every case; one JSON line). With --apply, carry it out."""
    from model.artifact_store import promote as promote_canary
    from model.artifact_store import stop_canary
    from stream_worker.canary_judge import judge, scrape

    settings = load_settings()
    store = _store(settings, artifacts)
    running = store.read_canary()
    if running is None:
        raise ArtifactError(f"no canary runs under {store.url}")
    live = store.read_current()

    def model_version(version: str) -> str:
        return str(store.manifest(version).get("model_version", version))

    verdict = judge(
        scrape(metrics), model_version(live), model_version(running.version),
        min_scored=min_scored, margin=margin,
    )  # fmt: skip
    applied = False
    if apply and verdict.decision == "promote":
        promote_canary(store, settings.artifacts.cache_dir)
        applied = True
    elif apply and verdict.decision == "stop":
        stop_canary(store)
        applied = True
    typer.echo(
        json.dumps(
            {"decision": verdict.decision, "reason": verdict.reason, "applied": applied,
             "live": live, "canary": running.version, "live_scored": verdict.live_scored,
             "canary_scored": verdict.canary_scored, "live_ndcg@10": verdict.live_ndcg,
             "canary_ndcg@10": verdict.canary_ndcg}
        )
    )  # fmt: skip


@app.command()
def promote(artifacts: ArtifactsRootOpt = None) -> None:
    """Make the canary the live version (CURRENT) and end it; workers follow."""
    from model.artifact_store import promote as promote_canary

    settings = load_settings()
    promoted, previous = promote_canary(_store(settings, artifacts), settings.artifacts.cache_dir)
    typer.echo(json.dumps({"current": promoted.version, "previous": previous}))


@app.command()
def gc(
    keep: Annotated[
        int, typer.Option(min=1, help="Newest versions to keep (the live one always).")
    ],
    artifacts: ArtifactsRootOpt = None,
) -> None:
    """Delete old versions: all but the newest KEEP, never the one CURRENT names nor
    the canary."""
    from model.artifact_store import gc as collect

    settings = load_settings()
    store = _store(settings, artifacts)
    deleted = collect(store, keep)
    typer.echo(json.dumps({"root": store.url, "deleted": deleted}))


@app.command()
def report(
    url: Annotated[
        str, typer.Option(help="A worker's metrics page.")
    ] = "http://127.0.0.1:6066/metrics",
    duration: Annotated[float, typer.Option(min=1, help="Seconds to watch.")] = 600,
    every: Annotated[float, typer.Option(min=0.1, help="Seconds between scrapes.")] = 10,
    out: Annotated[Path, typer.Option(help="The PNG to write.")] = Path("online_hr10.png"),
) -> None:
    """Watch a running worker: online HR@10 per model version over time, as a PNG (and
    one line per scrape)."""
    tool = _tool("report")

    load_settings()

    def show(sample: Any) -> None:
        shown = ", ".join(f"{v} {hr:.3f}" for v, hr in sorted(sample.hr().items()))
        typer.echo(f"{sample.seconds:7.1f}s  online HR@10: {shown or 'nothing scored yet'}")

    samples = tool.record(url, duration, every, show)
    if not tool.plot_online(samples, out, f"online HR@10 of {url}"):
        raise ConfigError(f"no event was scored online in {duration:g}s: nothing to draw")
    last = samples[-1].hr()
    typer.echo(json.dumps({"png": str(out), "online_hr@10": last, "samples": len(samples)}))


@app.command("settings")
def settings_command() -> None:
    """Print every RECSTREAM_* variable with its default and meaning (a Markdown table)."""
    from stream_worker.settings import settings_table

    typer.echo(settings_table())


@app.command()
def worker() -> None:
    """Run the streaming worker until SIGINT/SIGTERM (settings from RECSTREAM_* variables)."""
    from stream_worker.service import run_worker

    run_worker(load_settings())


@app.command()
def migrate(
    revision: Annotated[
        str,
        typer.Option(
            help="Target revision: head (default), or an earlier one to downgrade to "
            "(base: drop everything)."
        ),
    ] = "head",
) -> None:
    """Bring the state database (RECSTREAM_DATABASE__URL) to a revision: upgrade, or
    downgrade to an earlier one."""
    from stream_worker.store import redacted, run_migrations

    settings = load_settings()
    url = settings.database.url.get_secret_value()
    before, after = run_migrations(url, revision)
    typer.echo(f"database {redacted(url)}: {before or 'empty'} -> {after or 'empty'}")


@app.command()
def produce(
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Interaction log to replay.", exists=True, dir_okay=False),
    ] = None,
    fmt: FormatOpt = None,
    generate: Annotated[
        int, typer.Option(min=0, help="Generate this many synthetic clicks instead.")
    ] = 0,
    speed: Annotated[
        float, typer.Option(min=0, help="Replay N times faster than event time; 0: no pacing.")
    ] = 0.0,
    rate: Annotated[float, typer.Option(min=0, help="Most events per second; 0: unlimited.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Send at most N events.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Publish a dataset file (in event-time order) or generated clicks to the events topic."""
    from kafka import KafkaProducer

    from model.data import load_interactions
    from stream_worker.kafka_config import check_connection, kafka_python_options
    from stream_worker.produce import generate_clicks, plan_replay, send_events

    settings = load_settings()
    if (data is None) == (generate == 0):
        raise ConfigError("give either --data PATH or --generate N")
    if data is not None:
        plan = plan_replay(load_interactions(data, fmt), speed=speed, limit=limit)
    else:
        plan = generate_clicks(generate if limit is None else min(generate, limit))
    check_connection(settings.kafka)
    producer = KafkaProducer(**kafka_python_options(settings.kafka), linger_ms=5, acks="all")
    try:
        sent = send_events(producer, settings.topics.events, plan, rate=rate, progress=progress)
    finally:
        producer.close()
    typer.echo(json.dumps({"sent": sent, "topic": settings.topics.events}))


@app.command()
def demo(
    artifacts: Annotated[
        Path | None, typer.Option(help="Serve this artifact root instead of training.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Train on and replay this log instead of generated clicks.", exists=True),
    ] = None,
    events: Annotated[int, typer.Option(min=1, help="Clicks to replay.")] = 3000,
    rate: Annotated[float, typer.Option(min=0, help="Events per second; 0: unlimited.")] = 200,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs for the demo model.")] = 15,
    show: Annotated[int, typer.Option(min=0, help="Recommendations to print in full.")] = 20,
    workdir: Annotated[Path, typer.Option(help="Scratch directory (recreated).")] = Path(
        "var/demo"
    ),
    broker: Annotated[
        str,
        typer.Option(
            help="tansu (embedded, no JVM) or kafka (one Apache Kafka node, needs Java 17 "
            "and Maven)."
        ),
    ] = "tansu",
) -> None:
    """Local broker + SQLite + a small model + one worker: watch recommendations stream."""
    run_demo = _tool("demo").run_demo

    settings = load_settings()
    run_demo(
        settings,
        workdir=workdir,
        artifacts=artifacts,
        data=data,
        events=events,
        rate=rate,
        epochs=epochs,
        show=show,
        broker=broker,
    )


bench_app = typer.Typer(
    help="Benchmarks that print figures: end to end, encoder, FAISS index.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
BenchOutOpt = Annotated[Path, typer.Option("--out", help="Directory for tables, JSON and plots.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
QuickOpt = Annotated[bool, typer.Option(help="Tiny sizes: a smoke run of a few seconds.")]


DatasetOpt = Annotated[
    list[str] | None, typer.Option(help="taobao and/or ml-1m (repeat); default both.")
]
DataRootOpt = Annotated[Path, typer.Option(help="Folder of the shared datasets.")]


def _datasets(chosen: list[str] | None) -> list[str]:
    """The benchmark datasets asked for (all by default), each one known."""
    DATASETS = _tool("bench.e2e").DATASETS

    unknown = sorted(set(chosen or []) - set(DATASETS))
    if unknown:
        raise ConfigError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    return chosen or list(DATASETS)


def _floats(spec: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated numbers: {spec!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"{option} must be comma-separated numbers >= 0: {spec!r}")
    return values


@bench_app.command("e2e")
def bench_e2e(
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = Path("../shared/data"),
    events: Annotated[int, typer.Option(min=1, help="Events per unthrottled replay.")] = 100_000,
    rates: Annotated[
        str, typer.Option(help="Offered loads in events/s, comma-separated; 0: unthrottled.")
    ] = "500,2000,8000,0",
    rated_seconds: Annotated[
        float, typer.Option(min=1, help="Length of each throttled replay.")
    ] = 20.0,
    broker: Annotated[
        list[str] | None,
        typer.Option(
            help="kafka (one Apache Kafka node started here) and/or tansu (the demo's "
            "embedded broker); repeat to run both side by side. Default: kafka."
        ),
    ] = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            help="sqlite (a fresh file per load) and/or postgres (a fresh database per "
            "load on --pg-admin-url's server); repeat for both. Default: sqlite."
        ),
    ] = None,
    bootstrap: Annotated[
        str | None, typer.Option(help="Use this broker instead of starting one.")
    ] = None,
    broker_pid: Annotated[
        int | None,
        typer.Option(help="Process id of the --bootstrap broker, to report its CPU."),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="One state database for every load, instead of --state.")
    ] = None,
    pg_admin_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL server for --state postgres (default: 127.0.0.1:5432)."),
    ] = None,
    index_factory: Annotated[
        str, typer.Option(help="FAISS factory of the benchmark model's index.")
    ] = "Flat",
    load_nice: Annotated[
        int,
        typer.Option(
            min=0,
            max=19,
            help="Niceness of the producer and collector processes, so that they yield "
            "the CPU to the worker and the broker.",
        ),
    ] = 10,
    out: BenchOutOpt = Path("bench-out/e2e"),
) -> None:
    """Replay real events through a broker into one worker; throughput, latency, stages."""
    run_e2e = _tool("bench.e2e").run_e2e

    load_settings()
    report = run_e2e(
        datasets=_datasets(dataset),
        data_root=data_root,
        events=events,
        rates=_floats(rates, "--rates"),
        out_dir=out,
        brokers=broker or ["kafka"],
        states=state or ["sqlite"],
        bootstrap=bootstrap,
        broker_pid=broker_pid,
        database_url=database_url,
        pg_admin_url=pg_admin_url,
        rated_seconds=rated_seconds,
        index_factory=index_factory,
        load_nice=load_nice,
    )
    typer.echo(report)


@bench_app.command("incremental")
def bench_incremental(
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = Path("../shared/data"),
    events: Annotated[int, typer.Option(min=1, help="Events to replay per dataset.")] = 100_000,
    batch_events: Annotated[
        str,
        typer.Option(
            help="Events per batch, comma-separated (the worker's mean batch: 30-90 for "
            "Taobao at 2,000 events/s, ~1,000 unthrottled)."
        ),
    ] = "90,1000",
    cache_mb: Annotated[int, typer.Option(min=1, help="The encoder cache's budget.")] = 256,
    device: DeviceOpt = "auto",
    out: BenchOutOpt = Path("bench-out/incremental"),
) -> None:
    """The encode stage on real event order, with and without the encoder cache."""
    run_incremental = _tool("bench.incremental").run_incremental

    load_settings()
    datasets = _datasets(dataset)
    sizes = [int(v) for v in _floats(batch_events, "--batch-events")]
    if any(size < 1 for size in sizes):
        raise ConfigError(f"--batch-events must be whole numbers >= 1: {batch_events!r}")
    report = run_incremental(
        datasets=datasets,
        data_root=data_root,
        events=events,
        batch_events=sizes,
        out_dir=out,
        device=device,
        cache_mb=cache_mb,
    )
    typer.echo(report)


@bench_app.command("canary")
def bench_canary(
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = Path("../shared/data"),
    events: Annotated[int, typer.Option(min=2, help="Events to serve per dataset.")] = 200_000,
    share: Annotated[float, typer.Option(help="The canary's share of users.")] = 0.1,
    cache_mb: Annotated[int, typer.Option(min=1, help="The encoder caches' one budget.")] = 256,
    max_len: Annotated[int, typer.Option(min=1, help="The models' max_len.")] = 200,
    out: BenchOutOpt = Path("bench-out/canary"),
) -> None:
    """Memory of one process serving real events: live version alone, then with a canary."""
    run_canary_memory = _tool("bench.canary").run_canary_memory

    load_settings()
    reports = [
        run_canary_memory(name, data_root, events, share, cache_mb, max_len, out)
        for name in _datasets(dataset)
    ]
    typer.echo("\n\n".join(reports))


@bench_app.command("text")
def bench_text(
    data_root: DataRootOpt = Path("../shared/data"),
    texts: Annotated[int, typer.Option(min=1, help="Item texts to embed.")] = 100_000,
    runs: Annotated[int, typer.Option(min=1, help="Times to embed them (median).")] = 3,
    add: Annotated[int, typer.Option(min=1, help="Items for the add-items run.")] = 1_000,
    artifacts: Annotated[
        Path | None,
        typer.Option(help="A local root whose CURRENT has a text tower: time add-items on it."),
    ] = None,
    out: BenchOutOpt = Path("bench-out/text"),
) -> None:
    """Item texts embedded per second, and `recstream add-items` end to end."""
    run_text_speed = _tool("bench.text").run_text_speed

    load_settings()
    typer.echo(run_text_speed(data_root, texts, runs, add, artifacts, out))


@bench_app.command("train")
def bench_train(
    data: DataOpt,
    fmt: FormatOpt = None,
    columns: Annotated[
        str | None, typer.Option(help="Column mapping for csv/parquet: user=COL,item=COL,...")
    ] = None,
    variants: Annotated[
        str,
        typer.Option(help="Comma-separated variants; the first is the baseline."),
    ] = "torch-dropout,base,bf16,batch-128,batch-512,sampled,foreach-adamw",
    rounds: Annotated[int, typer.Option(min=1, help="Turns each variant takes.")] = 5,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per variant per turn.")] = 6,
    out: BenchOutOpt = Path("bench-out/train"),
) -> None:
    """Training step speed, variants side by side, on a log file with the
    RECSTREAM_TRAIN__* settings (dropout's draw, bf16, batch size, sampled softmax)."""
    from model.data import build_sequence_data, load_interactions

    run_training_speed = _tool("bench.training").run_training_speed
    settings = load_settings()
    log = load_interactions(data, fmt, _columns(columns))
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    sequences = build_sequence_data(log.sequences())
    typer.echo(run_training_speed(data.stem, sequences, settings.train, chosen, rounds, steps, out))


@bench_app.command("make-log")
def bench_make_log(
    out: Annotated[Path, typer.Option("--out", help="The log file to write.")],
    users: Annotated[int, typer.Option(min=1, help="Users.")] = 40_226,
    items: Annotated[int, typer.Option(min=2, help="Catalogue size.")] = 54_542,
    length: Annotated[int, typer.Option(min=3, help="Mean events per user.")] = 25,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """A generated TSV log of a large catalogue, for timing training (the
    defaults: the size of a public log of 40,226 users and 54,542 items)."""
    write_synthetic_log = _tool("bench.training").write_synthetic_log

    lines = write_synthetic_log(out, users, items, length, seed)
    typer.echo(json.dumps({"out": str(out), "users": users, "items": items, "events": lines}))


@bench_app.command("encoder")
def bench_encoder(
    out: BenchOutOpt = Path("bench-out/encoder"),
    device: DeviceOpt = "auto",
    quick: QuickOpt = False,
) -> None:
    """TorchScript encoder latency and throughput, batch 1-1024, max length 50 and 200."""
    run_encoder = _tool("bench.micro").run_encoder

    load_settings()
    typer.echo(run_encoder(out, device, quick))


@bench_app.command("index")
def bench_index(
    out: BenchOutOpt = Path("bench-out/index"),
    device: DeviceOpt = "auto",
    quick: QuickOpt = False,
    sizes: Annotated[str, typer.Option(help="Catalogue sizes, comma-separated.")] = (
        "10000,100000,1000000"
    ),
) -> None:
    """FAISS exact versus IVF and HNSW: QPS and recall@10 at several catalogue sizes."""
    run_index = _tool("bench.micro").run_index

    load_settings()
    sizes_list = tuple(int(v) for v in _floats(sizes, "--sizes"))
    typer.echo(run_index(out, device, quick, sizes_list))


def main() -> None:
    try:
        app()
    except RecstreamError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
