"""Static checks of deploy/: no container or cluster runs on the development machine.

Every overlay is rendered with ``kubectl kustomize``, validated offline against the
Kubernetes schemas (``kubernetes-validate``, strict) and scanned for insecure settings
(``checkov``, together with the Dockerfile); the Dockerfile is linted (``hadolint``).
The tools come from ``scripts/run test``: kubectl from apt, the rest from
``requirements-tools.lock`` into ``.venv-tools/``. A missing tool fails these tests,
saying how to install it: it never turns into a skip.
"""

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from stream_worker.settings import Settings

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "gpu", "s3")
TOOLS_BIN = Path(os.environ.get("RECSTREAM_TOOLS_VENV", REPO / ".venv-tools")) / "bin"
# The oldest Kubernetes these manifests are meant for (CronJob timeZone and Job
# podFailurePolicy are GA there), and kubernetes-validate's newest.
K8S_VERSIONS = ("1.31", None)
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
# checkov findings accepted with a reason in the manifests: the image digest (set at
# release time) and secrets as environment variables (how recstream reads settings);
# in the Dockerfile, a base image named by a build argument (its default is tagged).
ACCEPTED_FINDINGS = {"CKV_K8S_43", "CKV_K8S_35", "CKV_DOCKER_7"}


def missing(what: str) -> None:
    reason = (
        f"{what} is not installed: `scripts/run test` installs it "
        "(kubectl with apt, the others from requirements-tools.lock into .venv-tools/)"
    )
    pytest.fail(reason)


def tool(name: str) -> str:
    """The pinned tools environment first, then PATH (kubectl comes from apt)."""
    found = shutil.which(name, path=str(TOOLS_BIN)) or shutil.which(name)
    if not found:
        missing(name)
    assert found
    return found


def tools_python() -> str:
    python = TOOLS_BIN / "python"
    if not python.exists():
        missing(f"the tools environment {TOOLS_BIN.parent}")
    return str(python)


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, input=input, timeout=300, check=False, cwd=REPO
    )


def load_yaml(text: str) -> list[Any]:
    """PyYAML lives in the tools environment only (a checkov dependency), not in .venv."""
    proc = run(
        tools_python(),
        "-c",
        "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        input=text,
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in json.loads(proc.stdout) if doc]


@dataclass
class Rendered:
    overlay: str
    path: Path
    docs: list[dict[str, Any]]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [
            d for d in self.docs if d["kind"] == kind and name in (None, d["metadata"]["name"])
        ]
        assert len(found) == 1, f"{self.overlay}: expected one {kind} {name or ''}, got {found}"
        return found[0]

    def config(self) -> dict[str, str]:
        data: dict[str, str] = self.one("ConfigMap", "recstream-config")["data"]
        return data


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    kubectl = tool("kubectl")
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for overlay in OVERLAYS:
        proc = run(kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
        assert proc.returncode == 0, f"kubectl kustomize {overlay}:\n{proc.stderr}"
        path = out / f"{overlay}.yaml"
        path.write_text(proc.stdout)
        result[overlay] = Rendered(overlay, path, load_yaml(proc.stdout))
    return result


@pytest.fixture(params=OVERLAYS)
def each(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    return rendered[request.param]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    result: dict[str, Any] = spec["template"]["spec"]
    return result


def containers(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for doc in rendered.docs:
        if doc["kind"] in {"Deployment", "Job", "CronJob"}:
            spec = pod_spec(doc)
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield doc["metadata"]["name"], spec, container


# ------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_every_overlay_validates_against_the_kubernetes_schemas(
    rendered: dict[str, Rendered], version: str | None
) -> None:
    validate = tool("kubernetes-validate")
    args = [validate, "--strict", *(["-k", version] if version else [])]
    proc = run(*args, *(str(r.path) for r in rendered.values()))
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert proc.returncode == 0, "\n".join(lines)
    problems = [line for line in lines if not line.startswith("INFO")]
    # Only KEDA's custom resources have no bundled schema; test_keda_scaling checks them.
    unexplained = [p for p in problems if not any(f"kind {k} " in p for k in KEDA_KINDS)]
    assert not unexplained, "\n".join(unexplained)
    validated = sum(line.startswith("INFO") and "passed" in line for line in lines)
    expected = sum(
        1 for r in rendered.values() for d in r.docs if d["kind"] not in KEDA_KINDS
    )  # fmt: skip
    assert validated == expected


# The subset of KEDA's v1alpha1 CRDs these manifests use (https://keda.sh/docs/), strict
# about unknown fields so a typo cannot slip through unvalidated.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers", "minReplicaCount", "maxReplicaCount"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "kafka"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}},
                            },
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                                "required": [
                                    "bootstrapServers",
                                    "consumerGroup",
                                    "topic",
                                    "lagThreshold",
                                ],
                                "propertyNames": {
                                    "enum": [
                                        "bootstrapServers",
                                        "consumerGroup",
                                        "topic",
                                        "lagThreshold",
                                        "activationLagThreshold",
                                        "offsetResetPolicy",
                                        "allowIdleConsumers",
                                        "limitToPartitionsWithLag",
                                        "sasl",
                                        "tls",
                                    ]
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
TRIGGER_AUTHENTICATION = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name", "key"],
                        "properties": {
                            "parameter": {"enum": ["username", "password", "sasl", "tls", "ca"]},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    },
                }
            },
        }
    },
}


def test_keda_scaling_follows_lag_and_never_exceeds_the_partitions(each: Rendered) -> None:
    scaled = each.one("ScaledObject")
    jsonschema.validate(scaled, SCALED_OBJECT)
    auth = each.one("TriggerAuthentication")
    jsonschema.validate(auth, TRIGGER_AUTHENTICATION)
    spec, config = scaled["spec"], each.config()
    assert spec["scaleTargetRef"]["name"] == each.one("Deployment")["metadata"]["name"]
    # More consumers than partitions idle: the cap is the events topic's partition count.
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] <= int(config["RECSTREAM_TOPICS__PARTITIONS"])
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert meta["topic"] == config["RECSTREAM_TOPICS__EVENTS"]
    assert meta["consumerGroup"] == config["RECSTREAM_WORKER__GROUP_ID"]
    assert meta["bootstrapServers"] == config["RECSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
    assert meta.get("allowIdleConsumers", "false") == "false"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


# -------------------------------------------------------------------------- invariants


def test_the_worker_is_probed_secured_and_budgeted(each: Rendered) -> None:
    worker = each.one("Deployment", "recstream-worker")
    spec = pod_spec(worker)
    (container,) = spec["containers"]
    assert container["args"] == ["worker"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 6066}
    paths = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/live"}
    for probe, path in paths.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports[get["port"]] == 6066
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    if each.overlay != "s3":
        artifacts = mounts[each.config()["RECSTREAM_ARTIFACTS__ROOT"]]
        assert artifacts.get("readOnly") is True  # workers only read versions
    pdb = each.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    service = each.one("Service", "recstream-metrics")
    assert service["spec"]["selector"] == worker["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in service["spec"]["ports"]] == [6066]
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_every_pod_runs_non_root_with_a_read_only_root_filesystem(each: Rendered) -> None:
    seen = set()
    for name, spec, container in containers(each):
        seen.add(name)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, name
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"]["drop"] == ["ALL"], name
        assert container["resources"]["limits"].get("memory"), name
    assert seen == {"recstream-worker", "recstream-retrain", "recstream-build-index"}


def test_workers_migrate_first_and_jobs_retrain_on_the_shared_artifacts_volume(
    each: Rendered,
) -> None:
    """A rollout migrates before new workers start, in their init container: no Job
    whose immutable template must be deleted by hand before each upgrade."""
    assert not [d for d in each.docs if d["kind"] == "Job"]
    worker_pod = pod_spec(each.one("Deployment", "recstream-worker"))
    (migrate,) = worker_pod["initContainers"]
    (worker,) = worker_pod["containers"]
    assert migrate["args"] == ["migrate"] and migrate["image"] == worker["image"]
    assert migrate["envFrom"] == worker["envFrom"]
    database = {e["name"]: e for e in migrate["env"]}["RECSTREAM_DATABASE__URL"]
    assert database == {e["name"]: e for e in worker["env"]}["RECSTREAM_DATABASE__URL"]
    cron = each.one("CronJob", "recstream-retrain")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    spec = pod_spec(cron)
    (container,) = spec["containers"]
    assert container["args"] == ["retrain"]
    build = each.one("CronJob", "recstream-build-index")
    assert build["spec"]["suspend"] is True  # run on demand: kubectl create job --from=...
    assert pod_spec(build)["containers"][0]["args"] == ["build-index"]
    config = each.config()
    pods = (spec, pod_spec(build), pod_spec(each.one("Deployment")))
    if each.overlay == "s3":
        # Object storage: no volume shared between pods, credentials from their Secret.
        assert config["RECSTREAM_ARTIFACTS__ROOT"].startswith("s3://")
        assert not [d for d in each.docs if d["kind"] == "PersistentVolumeClaim"]
        for pod in pods:
            assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "recstream-s3"
            cache = config["RECSTREAM_ARTIFACTS__CACHE_DIR"]
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == cache]
            assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mount["name"]]
        return
    pvc = each.one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    root = config["RECSTREAM_ARTIFACTS__ROOT"]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [
            m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == root
        ]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]


def test_secrets_come_from_the_secret_and_settings_from_the_configmap(each: Rendered) -> None:
    config = each.config()
    assert all(key.startswith("RECSTREAM_") for key in config)
    for secret in ("DATABASE__URL", "KAFKA__SASL_PASSWORD", "KAFKA__SASL_USERNAME"):
        assert f"RECSTREAM_{secret}" not in config
    for name, _, container in containers(each):
        assert container["envFrom"] == [{"configMapRef": {"name": "recstream-config"}}], name
        env = {e["name"]: e for e in container["env"]}
        for var in ("RECSTREAM_DATABASE__URL", "RECSTREAM_KAFKA__SASL_PASSWORD"):
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "recstream-secrets", name


def test_the_configmap_holds_valid_recstream_settings(
    each: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key names a settings field (a typo would be silently ignored) and the
    values, with placeholder secrets, pass the settings' own validation."""
    config = each.config()
    for key in config:
        model: type[BaseModel] = Settings
        *parents, leaf = key.removeprefix("RECSTREAM_").lower().split("__")
        for part in parents:
            assert part in model.model_fields, key
            annotation = model.model_fields[part].annotation
            assert isinstance(annotation, type) and issubclass(annotation, BaseModel), key
            model = annotation
        assert leaf in model.model_fields, key
    for name in list(os.environ):
        if name.startswith("RECSTREAM_"):
            monkeypatch.delenv(name)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RECSTREAM_KAFKA__SASL_USERNAME", "user")
    monkeypatch.setenv("RECSTREAM_KAFKA__SASL_PASSWORD", "placeholder")
    monkeypatch.setenv("RECSTREAM_DATABASE__URL", "postgresql://u:p@db:5432/recstream")
    settings = Settings()
    assert str(settings.artifacts.root) == config["RECSTREAM_ARTIFACTS__ROOT"]


def test_only_the_gpu_overlay_asks_for_gpus(rendered: dict[str, Rendered]) -> None:
    for overlay, r in rendered.items():
        for name, _, container in containers(r):
            limits = container["resources"]["limits"]
            # The migration init container needs no GPU.
            wants_gpu = (
                overlay == "gpu"
                and name in {"recstream-worker", "recstream-retrain"}
                and container["name"] != "migrate"
            )
            assert (limits.get("nvidia.com/gpu") == "1") is wants_gpu, (overlay, name)
            assert container["image"].endswith("-cuda" if overlay == "gpu" else "-cpu")
    assert rendered["gpu"].config()["RECSTREAM_WORKER__DEVICE"] == "cuda"
    assert rendered["cpu"].config()["RECSTREAM_WORKER__DEVICE"] == "cpu"


# --------------------------------------------------------------------- linters, scanners


def test_checkov_finds_nothing_in_the_manifests_and_the_dockerfile(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    checkov = tool("checkov")
    for r in rendered.values():
        shutil.copy(r.path, tmp_path / r.path.name)
    shutil.copy(DEPLOY / "Dockerfile", tmp_path / "Dockerfile")
    proc = run(
        checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "dockerfile",
        "--output", "json", "--compact", "--skip-download",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert by_type.keys() == {"kubernetes", "dockerfile"}, proc.stdout[:2000]
    for check_type, report in by_type.items():
        summary = report["summary"]
        assert summary["failed"] == 0 and summary["parsing_errors"] == 0, (check_type, summary)
        assert summary["passed"] > 0
        # Every accepted finding carries its reason (checkov.io/skipN: CHECK=reason), and
        # only the reviewed ones are accepted (see the annotations in deploy/k8s/base).
        skipped = report["results"]["skipped_checks"]
        for check in skipped:
            assert len(check["check_result"].get("suppress_comment", "")) > 20, check
        assert {c["check_id"] for c in skipped} <= ACCEPTED_FINDINGS, check_type


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = tool("hadolint")
    proc = run(hadolint, "--failure-threshold", "style", str(DEPLOY / "Dockerfile"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.strip()


def test_compose_runs_broker_database_worker_and_producer() -> None:
    (compose,) = load_yaml((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"broker", "postgres", "migrate", "model-init", "worker", "producer"} <= set(services)
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["RECSTREAM_DATABASE__URL"].startswith("postgresql://")
    for name in ("migrate", "model-init", "worker", "producer", "retrain"):
        service = services[name]
        assert service["user"] == "10001:10001" and service["read_only"] is True, name
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file(), name
    assert services["producer"]["command"][0] == "produce"
    assert services["retrain"]["command"] == ["retrain"]


def test_both_flavours_pin_the_same_torch_and_the_cuda_one_pins_faiss() -> None:
    def pins(name: str) -> dict[str, str]:
        lines = (REPO / name).read_text().splitlines()
        return dict(line.split("==", 1) for line in lines if "==" in line)

    runtime, cuda = pins("requirements.lock"), pins("requirements-cuda.lock")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert runtime["torch"] == cuda["torch"]
    assert f"ARG TORCH_VERSION={runtime['torch']}" in dockerfile
    assert "faiss-gpu-cu12" in cuda and "faiss-cpu" not in cuda
    assert "requirements-cuda.lock" in (DEPLOY / "Dockerfile.dockerignore").read_text()
