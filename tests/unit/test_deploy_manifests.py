"""The Kubernetes manifests in deploy/kubernetes render, validate against the Kubernetes OpenAPI
schemas, pass checkov's policy scan, and agree with the server's flags and endpoints.

Tools: `kubectl` (its built-in kustomize, v4 or newer, renders base and overlays), the
`kubernetes-validate` package (test extra), and `checkov` (its own virtualenv, made by
scripts/ci_machine_setup.sh; or FLUXSERVE_CHECKOV=/path/to/checkov). On CI (`CI=true`) a missing
tool fails the tests that need it; on a developer machine they are skipped with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = {"base": K8S / "base", "tensor-parallel": K8S / "overlays" / "tensor-parallel"}
MULTINODE = K8S / "multinode" / "leaderworkerset.yaml"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
CHECKOV_CONFIG = K8S / ".checkov.yaml"
CHECKOV_VERSION = "3.3.30"
# Oldest and newest Kubernetes versions the manifests must be valid for.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())
PRESTOP_S = 5
ENGINE_SHUTDOWN_S = 10  # what stopping the engine takes after the drain


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"true", "1", "yes"}


def _missing_tool(reason: str):
    if _on_ci():
        pytest.fail(f"CI=true and {reason} (.ci/run runs scripts/ci_machine_setup.sh)")
    pytest.skip(reason)


@functools.cache
def _kubectl() -> str | None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    version = subprocess.run([kubectl, "version", "--client", "-o", "json"],
                             capture_output=True, text=True, timeout=60)
    kustomize = json.loads(version.stdout or "{}").get("kustomizeVersion", "v0")
    # Older kubectl (Debian's 1.20: kustomize v2) cannot read `resources: [../../base]`.
    return kubectl if int(re.sub(r"^v(\d+).*", r"\1", kustomize) or 0) >= 4 else None


@functools.cache
def _render(name: str) -> tuple[dict, ...]:
    kubectl = _kubectl()
    if not kubectl:
        _missing_tool("kubectl with kustomize >= v4 is not on PATH")
    proc = subprocess.run([kubectl, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return tuple(yaml.safe_load_all(proc.stdout))


def _multinode() -> list[dict]:
    return list(yaml.safe_load_all(MULTINODE.read_text()))


def _one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def _pod_templates(docs) -> list[tuple[str, dict]]:
    """(name, pod template spec) of every workload in `docs`, LeaderWorkerSet included."""
    out = []
    for doc in docs:
        if doc["kind"] == "Deployment":
            out.append((doc["metadata"]["name"], doc["spec"]["template"]))
        elif doc["kind"] == "LeaderWorkerSet":
            lwt = doc["spec"]["leaderWorkerTemplate"]
            out.append((doc["metadata"]["name"] + "/leader", lwt["leaderTemplate"]))
            out.append((doc["metadata"]["name"] + "/worker", lwt["workerTemplate"]))
    return out


def _flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_match_the_kubernetes_openapi_schemas(name, version):
    docs = _render(name)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget", "ConfigMap", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_multinode_manifest_matches_the_schemas(version):
    docs = _multinode()
    # LeaderWorkerSet is a CRD (no schema in Kubernetes' OpenAPI): its pod templates are checked
    # as PodTemplates, its own fields against the LWS v1 API by hand.
    for name, template in _pod_templates(docs):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": name.replace("/", "-")},
                                      "template": template}, version, strict=True)
    lws = _one(docs, "LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert set(lws["spec"]) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy",
                                "startupPolicy", "networkConfig"}
    assert set(lws["spec"]["leaderWorkerTemplate"]) <= {
        "leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy",
        "volumeClaimTemplates"}
    for doc in docs:
        if doc["kind"] != "LeaderWorkerSet":
            kubernetes_validate.validate(doc, version, strict=True)


def test_multinode_ranks_and_parallel_sizes_agree():
    lws = _one(_multinode(), "LeaderWorkerSet")
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    (_, leader), (_, worker) = _pod_templates([lws])
    leader_args = leader["spec"]["containers"][0]["args"]
    worker_args = worker["spec"]["containers"][0]["args"]
    assert worker["spec"]["containers"][0]["command"] == ["vllm", "serve"]
    assert "--headless" in worker_args and "--headless" not in leader_args
    assert _flag(leader_args, "--node-rank") == "0"
    assert _flag(worker_args, "--node-rank") == "$(LWS_WORKER_INDEX)"
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--nnodes",
                 "--master-addr", "--master-port", "--distributed-executor-backend"):
        assert _flag(leader_args, flag) == _flag(worker_args, flag), flag
    world = int(_flag(leader_args, "--tensor-parallel-size")) * \
        int(_flag(leader_args, "--pipeline-parallel-size"))
    gpus = int(leader["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert world == gpus * size, (world, gpus, size)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_deployment_probes_gpus_drain_and_security(name):
    docs = _render(name)
    deployment = _one(docs, "Deployment")
    config = _one(docs, "ConfigMap")["data"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(container["resources"]["requests"]["nvidia.com/gpu"]) >= 1
    tp = int(_flag(container["args"], "--tensor-parallel-size") or 1)
    assert tp == gpus, "one tensor-parallel rank per requested GPU"
    # The grace period covers the preStop delay, the drain and the engine's shutdown.
    assert _flag(container["args"], "--drain-timeout") == "$(DRAIN_TIMEOUT)"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)]
    assert pod["terminationGracePeriodSeconds"] == \
        PRESTOP_S + int(config["DRAIN_TIMEOUT"]) + ENGINE_SHUTDOWN_S
    # Every $(VAR) in the args is defined for the container.
    defined = set(config) | {e["name"] for e in container.get("env", [])}
    used = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
    assert used <= defined, used - defined
    # Non-root, read-only root filesystem, writable emptyDirs where the image writes.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/cache/fluxserve", "/tmp", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path
    # The API key comes from the Secret.
    (key_env,) = [e for e in container["env"] if e["name"] == "FLUXSERVE_API_KEY"]
    secret = _one(docs, "Secret")
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_image_user_matches_the_pod_security_context():
    uid = int(re.search(r"useradd --uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    pod = _one(_render("base"), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid


def test_hpa_metric_is_served_by_the_prometheus_adapter_rules():
    docs = _render("base")
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    wanted = metric["pods"]["metric"]["name"]
    served = set()
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        # The vLLM series each rule selects, renamed as the adapter renames them.
        selected = re.search(r'__name__=~?"([^"]+)"', rule["seriesQuery"]).group(1)
        for candidate in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                          "vllm:kv_cache_usage_perc"):
            if re.fullmatch(selected, candidate):
                # The adapter's `as` takes regex groups of `matches` as ${1}, ${2}, ...
                renamed = re.sub(rule["name"]["matches"],
                                 rule["name"]["as"].replace("${", "\\g<").replace("}", ">"),
                                 candidate)
                served.add(renamed)
    assert wanted in served, (wanted, served)
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_services_select_the_serving_pods():
    for docs in (_render("base"), _multinode()):
        service = _one(docs, "Service")
        selectors = service["spec"]["selector"].items()
        templates = [t for name, t in _pod_templates(docs) if not name.endswith("/worker")]
        assert templates and all(selectors <= t["metadata"]["labels"].items()
                                 for t in templates)
        port_names = {p["name"] for t in templates for p in t["spec"]["containers"][0]["ports"]}
        assert service["spec"]["ports"][0]["targetPort"] in port_names


def _checkov() -> str:
    candidates = [os.environ.get("FLUXSERVE_CHECKOV"),
                  f"{os.environ.get('FLUXSERVE_CI_CACHE', '/var/cache/fluxserve-ci')}"
                  f"/checkov-{CHECKOV_VERSION}/bin/checkov",
                  shutil.which("checkov")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    _missing_tool("checkov is not installed (scripts/ci_machine_setup.sh makes its venv; or "
                  "set FLUXSERVE_CHECKOV)")
    raise AssertionError("unreachable")


def test_checkov_policy_scan_passes(tmp_path):
    checkov = _checkov()
    for name in KUSTOMIZATIONS:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(_render(name)))
    # checkov has no LeaderWorkerSet policies: its pod templates are scanned as Pods.
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {**template["metadata"], "name": name.replace("/", "-"),
                          "namespace": "fluxserve"},
             "spec": template["spec"]} for name, template in _pod_templates(_multinode())]
    (tmp_path / "multinode.yaml").write_text(yaml.safe_dump_all(
        [d for d in _multinode() if d["kind"] != "LeaderWorkerSet"] + pods))
    proc = subprocess.run(
        [checkov, "--config-file", str(CHECKOV_CONFIG), "--directory", str(tmp_path),
         "--framework", "kubernetes", "--output", "json", "--compact"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false"))
    reports = json.loads(proc.stdout or "null")
    assert reports is not None, proc.stderr[-3000:]
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"], c["file_path"], c["check_name"])
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert not failed, "\n".join(map(str, failed))
    scanned = {c["resource"] for r in reports for c in r.get("results", {}).get("passed_checks",
                                                                               [])}
    # It really scanned the workloads: both Deployments and both LWS pod templates.
    assert {"Deployment.fluxserve.fluxserve", "Pod.fluxserve.fluxserve-multinode-leader",
            "Pod.fluxserve.fluxserve-multinode-worker"} <= scanned, scanned
    assert passed > 50, reports
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_skipped_checkov_check_is_justified():
    lines = CHECKOV_CONFIG.read_text().splitlines()
    skips = yaml.safe_load(CHECKOV_CONFIG.read_text()).get("skip-check", [])
    assert skips, "no skip list: then drop this test"
    for check in skips:
        (i,) = [n for n, line in enumerate(lines) if line.strip() == f"- {check}"]
        assert lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 20, \
            f"{check}: put the reason for skipping it in a comment on the line above"
