"""The one settings class of recstream.

Built once at the entry point (``Settings()`` reads ``RECSTREAM_*`` variables, nested
with ``__``) and passed inward. Secrets are ``SecretStr`` so they never reach logs.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import IndexConfig, TrainConfig


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field(
        "localhost:9092", description="Kafka bootstrap servers, comma-separated host:port."
    )
    client_id: str = Field("recstream", description="Client id the broker sees (logs, quotas).")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients connect to the brokers."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (the SASL protocols need it)."
    )
    sasl_username: str | None = Field(None, description="SASL user.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: Path | None = Field(
        None, description="CA certificates (PEM) to verify the brokers; unset: the system's."
    )
    ssl_certfile: Path | None = Field(None, description="Client certificate (PEM), mutual TLS.")
    ssl_keyfile: Path | None = Field(
        None, description="Client certificate's key (PEM); unset: inside the certificate file."
    )
    ssl_password: SecretStr | None = Field(
        None, description="Password of an encrypted client key (never logged)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "KafkaSettings":
        # Security settings the chosen protocol would silently ignore are refused: an
        # operator who sets a CA file or SASL credentials expects them to be used.
        protocol = self.security_protocol
        sasl = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username,
            "sasl_password": self.sasl_password,
        }
        tls = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_password": self.ssl_password,
        }
        if protocol.startswith("SASL") and not all(sasl.values()):
            raise ValueError(
                "SASL needs kafka.sasl_mechanism, kafka.sasl_username and kafka.sasl_password"
            )
        unused = [name for name, value in sasl.items() if value is not None]
        if not protocol.startswith("SASL") and unused:
            raise ValueError(
                f"kafka.{unused[0]} is set but kafka.security_protocol is {protocol}, which "
                "does not use it: choose SASL_SSL (or SASL_PLAINTEXT) or unset it"
            )
        unused = [name for name, value in tls.items() if value is not None]
        if "SSL" not in protocol and unused:
            raise ValueError(
                f"kafka.{unused[0]} is set but kafka.security_protocol is {protocol}, which "
                "does not use TLS: choose SSL or SASL_SSL, or unset it"
            )
        if (self.ssl_keyfile or self.ssl_password) and not self.ssl_certfile:
            raise ValueError(
                "kafka.ssl_keyfile and kafka.ssl_password belong to a client certificate: "
                "set kafka.ssl_certfile too"
            )
        return self


class DatabaseSettings(BaseModel):
    # SecretStr: a PostgreSQL URL usually carries a password.
    url: SecretStr = Field(
        SecretStr("sqlite:///var/recstream.db"),
        description="SQLAlchemy URL of the state database (never logged).",
    )
    pool_size: int = Field(5, ge=1, description="Pooled connections (PostgreSQL).")
    echo: bool = Field(False, description="Log every SQL statement (debugging).")


class TopicSettings(BaseModel):
    events: str = Field("clickstream", description="Input topic of click events.")
    recommendations: str = Field("recommendations", description="Output topic.")
    dead_letter: str = Field(
        "clickstream.dlq", description="Records that are not valid events, with the reason."
    )
    partitions: int = Field(4, ge=1, description="Partitions when recstream creates a topic.")
    replication_factor: int | None = Field(
        None,
        ge=1,
        description="Replicas of topics the worker creates; unset: the broker's "
        "default.replication.factor.",
    )


class ArtifactSettings(BaseModel):
    """Versions and CURRENT (``model.artifact_store``)."""

    root: str = Field(
        "artifacts",
        description="Where versions and CURRENT live: a directory, or s3://BUCKET/PREFIX on "
        "any S3-compatible server (credentials from boto3's chain: AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, a profile or a role).",
    )
    endpoint_url: str | None = Field(
        None, description="The S3-compatible server of an s3:// root; unset: AWS."
    )
    cache_dir: Path = Field(
        Path("var/artifacts-cache"),
        description="Local copies of versions from an s3:// root (workers keep the live "
        "one and two before it; a restart or rollback does not download again).",
    )
    poll_interval_s: float = Field(5.0, gt=0, description="How often workers check CURRENT.")
    max_age_s: float = Field(
        2 * 24 * 3600.0,
        gt=0,
        description="Age of the serving model version past which it counts as stale: "
        "exported as recstream_serving_version_max_age_seconds, which the "
        "RecstreamServingVersionStale alert compares the version's age with.",
    )


class RetrainSettings(BaseModel):
    """The periodic ``recstream retrain`` job (training itself: ``RECSTREAM_TRAIN__*``)."""

    quality_margin: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Most the new model's validation NDCG@10 may fall below the live "
        "version's (absolute, both measured on the same fresh data) and still be published.",
    )
    min_users: int = Field(
        100, ge=1, description="Fewest users with 3+ stored items needed to train at all."
    )
    lock_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a run waits for another run's lock; 0 fails at once.",
    )


class WorkerSettings(BaseModel):
    group_id: str = Field("recstream", description="Consumer group (and faust app id).")
    batch_size: int = Field(
        4096,
        ge=1,
        description="Most events in one micro-batch. Under a backlog a larger batch answers "
        "more events per user and per fetch (unthrottled Taobao 1.6-2.2x faster than at "
        "1,024); at steady load batches stay far smaller.",
    )
    batch_max_wait_ms: int = Field(20, ge=0, description="Longest wait to fill a micro-batch.")
    commit_interval_s: float = Field(
        1.0,
        ge=0,
        description="Most seconds between offset commits under load (also on idle, "
        "rebalance and stop); offsets stored with the state make a late commit harmless.",
    )
    top_k: int = Field(10, ge=1, le=1000, description="Items per recommendation.")
    history_length: int = Field(
        200,
        ge=1,
        description="Items kept per user in the database; the encoder reads its own max_len "
        "of them, so a model with another max_len needs no migration.",
    )
    emit_per_event: bool = Field(
        False, description="One recommendation per event instead of one per user and batch."
    )
    max_id_length: int = Field(128, ge=1, description="Longest accepted id, in characters.")
    ts_past_window_s: int = Field(
        365 * 24 * 3600, ge=0, description="Oldest accepted event age, seconds."
    )
    ts_future_window_s: int = Field(300, ge=0, description="Furthest accepted clock skew.")
    device: str = Field("auto", description="auto, cpu or cuda for the encoder and index.")
    cpu_threads: int = Field(
        1,
        ge=0,
        description="Threads per encoder call and FAISS search on CPU (0: one per core). "
        "More than one stalls when the cores are shared with the broker or other work.",
    )
    encoder_cache_mb: int = Field(
        256,
        ge=0,
        description="Memory for each user's cached keys and values, so that a new event "
        "encodes one position instead of the whole history (0: off). Least recently "
        "active users are dropped first; ~1 KB per item at dim 64 with 2 blocks, 4 KB at dim 256.",
    )
    session_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Consumer group session timeout; a dead worker's partitions move after it.",
    )
    producer_linger_ms: int = Field(5, ge=0, description="Producer batching delay.")
    idempotent_producer: bool = Field(
        True,
        description="Outputs are sent by an idempotent producer, so a retry after a "
        "leader change or a lost connection never doubles one. Off only for brokers that "
        "lack InitProducerId (the demo's embedded tansu).",
    )
    fetch_max_wait_ms: int = Field(
        10,
        ge=1,
        description="Longest broker long-poll per fetch; brokers that hold fetches until "
        "it (tansu) make it a latency floor (p99 370 -> 112 ms at 2,000 events/s, 50 -> 10).",
    )
    gc_freeze: bool = Field(
        True,
        description="Move what start-up loaded (libraries, model, index) out of the garbage "
        "collector's sight: a full collection then scans only what batches allocate.",
    )
    web_port: int = Field(
        6066, ge=0, le=65535, description="HTTP port of /live, /ready and /metrics."
    )
    liveness_batch_s: float = Field(
        120.0,
        gt=0,
        description="Longest a batch may go without progress before /live fails (a "
        "database retry counts as progress: an outage makes the worker unready, not "
        "unlive); above the slowest batch you expect.",
    )
    data_dir: Path = Field(Path("var/worker"), description="faust's working directory.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RECSTREAM_",
        env_nested_delimiter="__",
        env_file=None,
        extra="ignore",
    )

    kafka: KafkaSettings = KafkaSettings()
    database: DatabaseSettings = DatabaseSettings()
    topics: TopicSettings = TopicSettings()
    artifacts: ArtifactSettings = ArtifactSettings()
    worker: WorkerSettings = WorkerSettings()
    retrain: RetrainSettings = RetrainSettings()
    train: TrainConfig = TrainConfig()  # model/config.py
    index: IndexConfig = IndexConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging level."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


@dataclass(frozen=True)
class SettingDoc:
    """One environment variable of :class:`Settings`, for the reference table."""

    variable: str
    default: str
    meaning: str


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()  # a default, never a configured secret
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _choices(annotation: Any) -> list[str]:
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return [c for arg in get_args(annotation) for c in _choices(arg)]


def settings_reference(
    model: type[BaseModel] = Settings, prefix: str = "RECSTREAM_"
) -> list[SettingDoc]:
    """Every variable the settings read, in declaration order, with its default and
    description: the source of the README's configuration table (``recstream settings``)."""
    rows: list[SettingDoc] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += settings_reference(annotation, f"{prefix}{name.upper()}__")
            continue
        meaning = (info.description or "").strip()
        choices = _choices(annotation)
        if choices:
            meaning += f" One of: {', '.join(choices)}."
        rows.append(SettingDoc(f"{prefix}{name.upper()}", _shown(info.default), meaning))
    return rows


def settings_table() -> str:
    """The reference as a Markdown table."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for row in settings_reference():
        meaning = row.meaning.replace("|", "\\|")
        default = "unset" if row.default == "unset" else f"`{row.default}`"
        lines.append(f"| `{row.variable}` | {default} | {meaning} |")
    return "\n".join(lines)
