"""The image and the Kubernetes manifests: valid, and every command line and setting in them is
one the worker understands, so a typo fails here rather than in a cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.cli import build_parser
from worker.domains import parse_sync_config
from worker.settings import ENVIRONMENT, EU_API_BASE, SECRETS, US_API_BASE

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
CORE_MANIFESTS = [p for p in MANIFESTS if "monitoring" not in p.parts]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is a test dependency; install the project with [test]"
    return found


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec", {})
    return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec") \
        or spec.get("template", {}).get("spec") or {}


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    pod = pod_of(doc)
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


@pytest.mark.slow
def test_manifests_pass_strict_kubernetes_validation():
    done = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", *map(str, CORE_MANIFESTS)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_manifests_and_config_pass_yamllint():
    done = subprocess.run([tool("yamllint"), "-s", "-c", str(ROOT / ".yamllint.yaml"), str(ROOT / "deploy")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path, doc in documents():
        for container in containers(doc):
            assert container.get("command") in (None, ["mailgun-sync"]), path
            found.append((f"{path.name}:{container['name']}", list(container.get("args", []))))
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE)[1])
    assert entrypoint == ["mailgun-sync"]
    found.append(("Dockerfile:CMD", json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)[1])))
    return found


@pytest.mark.parametrize(("where", "argv"), command_lines(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_line_parses_with_the_worker_parser(where, argv):
    build_parser().parse_args(argv)


def test_every_setting_in_the_manifests_is_one_the_worker_reads():
    names: set[str] = set()
    for _, doc in documents():
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
        for container in containers(doc):
            names |= {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] == "mailgun-sync"
    for kustomization in (K8S / "overlays").glob("*/kustomization.yaml"):
        for generator in yaml.safe_load(kustomization.read_text()).get("configMapGenerator", []):
            names |= {literal.split("=", 1)[0] for literal in generator.get("literals", [])}
    assert names - set(ENVIRONMENT) == set()


def test_no_secret_value_is_kept_in_git():
    for path, doc in documents():
        assert doc["kind"] != "Secret", f"{path} holds a Secret"


# The secrets each command reads; it is given those and no other.
SECRETS_NEEDED = {
    "daemon": set(SECRETS),
    "run": {"MAILGUN_API_KEY", "DATABASE_URL"},
    "backfill": {"MAILGUN_API_KEY", "DATABASE_URL"},
    "migrate": {"DATABASE_URL"},
}


def secret_files(doc: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """{setting: the file its `_FILE` variable names}, each file checked to be a key of the Secret
    `mailgun-sync` mounted read-only in the container, readable by the worker's group only."""
    pod = pod_of(doc)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, str] = {}
    mounted: dict[str, str] = {}  # file path -> the Secret's key it holds
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert secret["secretName"] == "mailgun-sync"
        assert mount.get("readOnly") is True, mount
        assert secret["defaultMode"] & 0o007 == 0, "no one but the worker's user and group reads it"
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        mounted |= {f"{mount['mountPath']}/{item['path']}": item["key"] for item in secret["items"]}
    for env in container.get("env", []):
        assert env["name"] not in SECRETS, f"{env['name']} as an environment value: use {env['name']}_FILE"
        assert "secretKeyRef" not in env.get("valueFrom", {}), env["name"]
        if env["name"].endswith("_FILE"):
            setting = env["name"].removesuffix("_FILE")
            assert setting in SECRETS, env["name"]
            assert mounted.get(env["value"]) == setting, f"{env['name']}: {env['value']} is not mounted"
            files[setting] = env["value"]
    assert not any("secretRef" in source for source in container.get("envFrom", []))
    return files


def test_each_container_reads_the_secrets_its_command_needs_from_files_of_the_mounted_secret():
    seen = set()
    for path, doc in documents():
        for container in containers(doc):
            command = container.get("args", ["daemon"])[0]
            where = f"{path}: {container['name']}"
            assert set(secret_files(doc, container)) == SECRETS_NEEDED[command], where
            seen.add(command)
    assert seen == set(SECRETS_NEEDED)


def test_the_daemon_gets_longer_to_stop_than_its_shutdown_grace():
    deployment = next(doc for _, doc in documents() if doc["kind"] == "Deployment")
    configmap = next(doc for _, doc in documents() if doc["kind"] == "ConfigMap")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(configmap["data"]["SHUTDOWN_GRACE"]) + 5


def test_probes_and_metrics_use_http_port_and_the_service_gives_the_webhooks_a_port_of_their_own():
    configmap = next(doc for _, doc in documents() if doc["kind"] == "ConfigMap")
    deployment = next(doc for _, doc in documents() if doc["kind"] == "Deployment")
    service = next(doc for _, doc in documents() if doc["kind"] == "Service")
    monitor = next(doc for _, doc in documents() if doc["kind"] == "ServiceMonitor")
    daemon = next(c for c in containers(deployment) if c.get("args") == ["daemon"])
    ports = {p["name"]: p["containerPort"] for p in daemon["ports"]}
    assert ports == {"http": int(configmap["data"]["HTTP_PORT"]),
                     "webhooks": int(configmap["data"]["WEBHOOK_PORT"])}
    assert daemon["livenessProbe"]["httpGet"]["port"] == "http"
    assert daemon["readinessProbe"]["httpGet"]["port"] == "http"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == \
        {"http": "http", "webhooks": "webhooks"}


def test_the_cronjob_never_overlaps_itself():
    cronjob = next(doc for _, doc in documents() if doc["kind"] == "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_the_regions_overlay_mounts_a_valid_sync_config_where_sync_config_points():
    overlay = K8S / "overlays" / "regions"
    config = parse_sync_config((overlay / "sync.toml").read_text(), source="sync.toml",
                               default_api_base=US_API_BASE)
    assert {d.api_base for d in config.domains} == {US_API_BASE, EU_API_BASE}
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    literals = [lit for g in kustomization["configMapGenerator"] for lit in g.get("literals", [])]
    patches = "".join(p["patch"] for p in kustomization["patches"])
    assert "SYNC_CONFIG=/etc/mailgun-sync/sync.toml" in literals
    assert patches.count("mountPath: /etc/mailgun-sync") == 2


OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
WORKLOADS = ("Deployment", "CronJob", "Job")


def rendered(directory: Path) -> list[dict[str, Any]]:
    """The manifests `kubectl apply -k directory` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is needed to render the overlays")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return (spec["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else spec)["template"]["spec"]


def worker_configuration(doc: dict[str, Any]) -> dict[str, Any]:
    """What a worker container is given: image, settings sources, and the files mounted for them."""
    [container] = pod_spec(doc)["containers"]
    volumes = {v["name"]: v for v in pod_spec(doc).get("volumes", [])}
    files = secret_files(doc, container)
    return {
        "namespace": doc["metadata"].get("namespace"),
        "image": container["image"],
        "envFrom": container.get("envFrom"),
        # the API key and the database URL, as files of the Secret (the daemon also has the signing key)
        "secrets": {name: files[name] for name in ("MAILGUN_API_KEY", "DATABASE_URL")},
        "mounts": sorted((m["mountPath"], volumes[m["name"]].get("configMap", {}).get("name", ""),
                          volumes[m["name"]].get("secret", {}).get("secretName", ""))
                         for m in container.get("volumeMounts", [])),
    }


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_workload_of_an_overlay_and_its_backfill_gets_the_same_configuration(overlay):
    assert (overlay / "backfill" / "kustomization.yaml").is_file(), "each overlay has its backfill"
    installation = rendered(overlay)
    backfill = rendered(overlay / "backfill")
    assert [d["kind"] for d in backfill] == ["Job"]
    workloads = [d for d in installation + backfill if d["kind"] in WORKLOADS
                 and pod_spec(d)["containers"][0].get("args", [None])[0] != "migrate"]
    assert sorted(d["metadata"]["name"] for d in workloads) == \
        ["mailgun-sync", "mailgun-sync-backfill", "mailgun-sync-run"]

    configurations = {d["metadata"]["name"]: worker_configuration(d) for d in workloads}
    first = next(iter(configurations.values()))
    assert first["namespace"], "the installation's namespace"
    assert not first["image"].endswith(":latest") and ":" in first["image"], "a pinned image"
    for name, configuration in configurations.items():
        assert configuration == first, name

    # SYNC_CONFIG, where set, points into a directory mounted from a ConfigMap the installation has.
    config_maps = {d["metadata"]["name"]: d for d in installation if d["kind"] == "ConfigMap"}
    config_file = config_maps["mailgun-sync"]["data"].get("SYNC_CONFIG")
    if config_file:
        [(_, mounted, _)] = [m for m in first["mounts"] if config_file.startswith(m[0] + "/")]
        assert Path(config_file).name in config_maps[mounted]["data"]
    # Every image in the installation (the migrating init container too) is the same one.
    images = {c["image"] for d in installation if d["kind"] in WORKLOADS
              for c in pod_spec(d).get("initContainers", []) + pod_spec(d)["containers"]}
    assert images == {first["image"]}


NAMESPACE = "mailgun-sync"


def test_every_manifest_names_the_namespace_the_overlays_merge_into():
    """Applied alone, no manifest lands in `default`; an overlay's `namespace:` moves them all, and
    its ConfigMap generator merges into the base's, found by name and the base's namespace."""
    for path, doc in documents():
        assert doc["metadata"].get("namespace") == NAMESPACE, path
    for kustomization in (K8S / "overlays").glob("*/kustomization.yaml"):
        for generator in yaml.safe_load(kustomization.read_text()).get("configMapGenerator", []):
            if generator.get("behavior") == "merge":
                assert generator.get("namespace") == NAMESPACE, kustomization


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def test_every_container_runs_the_release_of_this_version_and_pulls_what_its_tag_names_now():
    version = project_version()
    for path, doc in documents():
        for container in containers(doc):
            assert container["image"] == f"mailgun-sync:{version}", path
            assert container.get("imagePullPolicy") == "Always", path
    for kustomization in K8S.glob("overlays/**/kustomization.yaml"):
        for image in yaml.safe_load(kustomization.read_text()).get("images", []):
            assert image["newTag"] == version, kustomization


def test_every_container_has_cpu_and_memory_requests_and_limits():
    for path, doc in documents():
        for container in containers(doc):
            resources = container["resources"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}, \
                f"{path}: {container['name']}"


def test_only_the_daemon_takes_connections_and_only_on_its_probe_metrics_and_webhook_ports():
    policies = [doc for _, doc in documents() if doc["kind"] == "NetworkPolicy"]
    deployment = next(doc for _, doc in documents() if doc["kind"] == "Deployment")
    daemon = next(c for c in containers(deployment) if c.get("args") == ["daemon"])
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    every_pod = {"app.kubernetes.io/name": NAMESPACE}
    allowed: list[Any] = []
    for policy in policies:
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        selected = spec["podSelector"]["matchLabels"]
        assert selected.items() <= pod_labels.items()
        if selected != every_pod:  # the daemon's own
            allowed += [port["port"] for rule in spec["ingress"] for port in rule["ports"]]
            assert all(set(rule) == {"ports"} for rule in spec["ingress"])
    assert any(p["spec"]["podSelector"]["matchLabels"] == every_pod and "ingress" not in p["spec"]
               for p in policies), "a policy that selects every pod of the app and admits nothing"
    assert sorted(allowed) == sorted(port["name"] for port in daemon["ports"])


def test_each_checkov_exception_names_its_check_and_gives_its_reason():
    skips = [(path, value) for path, doc in documents()
             for key, value in doc["metadata"].get("annotations", {}).items()
             if key.startswith("checkov.io/skip")]
    assert skips
    for path, value in skips:
        assert re.fullmatch(r"CKV2?_K8S_\d+=\S.{40,}", value, re.DOTALL), f"{path}: {value}"


def test_every_pod_meets_the_restricted_pod_security_standard():
    """What `pod-security.kubernetes.io/enforce=restricted` on the namespace (README) requires."""
    for path, doc in documents():
        pod = pod_of(doc)
        if not pod:
            continue
        assert pod["securityContext"]["runAsNonRoot"] is True, path
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", path
        assert {kind for volume in pod.get("volumes", []) for kind in volume if kind != "name"} \
            <= {"configMap", "secret", "emptyDir"}, path
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), path
        for container in containers(doc):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, path
            assert context["capabilities"] == {"drop": ["ALL"]}, path
            assert not context.get("privileged"), path
            assert all("hostPort" not in port for port in container.get("ports", [])), path
