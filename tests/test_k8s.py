"""Kubernetes manifests (deploy/k8s): every overlay renders with `kubectl kustomize` and every
object is valid for a current Kubernetes (kubernetes-validate, strict: unknown fields fail);
then what a schema cannot see: probes, affinity, GPU requests, references between objects,
TAILOR_* names and values the service accepts, security settings, and the two bentofiles.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu", "self-contained"]
# The Kubernetes version the objects are validated against (schemas of kubernetes-validate).
K8S_VERSION = "1.37.0"
# kustomize features used here (components, patches, envs): kustomize v5 (kubectl >= 1.27).
MIN_KUSTOMIZE = (5, 0)
SERVING = {"app.kubernetes.io/name": "tailor", "app.kubernetes.io/component": "serving"}
WORKER = {"app.kubernetes.io/name": "tailor", "app.kubernetes.io/component": "worker"}
PLACEHOLDER = "CHANGE-ME"


# --- rendering ------------------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"v?(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _kustomize_command() -> list[str]:
    """`kubectl kustomize`, or a standalone `kustomize build`, when new enough; else skip."""
    found = []
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True,
                             text=True, timeout=30)
        version = json.loads(out.stdout or "{}").get("kustomizeVersion", "") if out.returncode == 0 else ""
        if _version(version) >= MIN_KUSTOMIZE:
            return [kubectl, "kustomize"]
        found.append(f"kubectl with kustomize {version or 'unknown'}")
    kustomize = shutil.which("kustomize")
    if kustomize:
        out = subprocess.run([kustomize, "version"], capture_output=True, text=True, timeout=30)
        if _version(out.stdout) >= MIN_KUSTOMIZE:
            return [kustomize, "build"]
        found.append(f"kustomize {out.stdout.strip()}")
    if not found:
        pytest.skip("kubectl is not installed: deploy/k8s needs kubectl >= 1.27 "
                    "(https://kubernetes.io/docs/tasks/tools/) or kustomize >= v5")
    pytest.skip(f"needs kustomize >= v{MIN_KUSTOMIZE[0]} (kubectl >= 1.27) for deploy/k8s; found "
                + ", ".join(found) + " (Debian bookworm's kubernetes-client 1.20 bundles kustomize v2)")


@pytest.fixture(scope="module")
def kustomize() -> list[str]:
    return _kustomize_command()


def _build(cmd: list[str], path: Path) -> list[dict]:
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} {path} failed:\n{out.stderr}"
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs, f"{path} rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered(kustomize) -> dict[str, list[dict]]:
    return {name: _build(kustomize, K8S / "overlays" / name) for name in OVERLAYS}


# --- helpers over rendered objects ----------------------------------------------------------

def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _generated(docs: list[dict], kind: str, name: str) -> dict:
    """A ConfigMap/Secret by its generator name (kustomize appends a content hash)."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?",
                                                                   d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _data(obj: dict) -> dict[str, str]:
    if obj["kind"] == "Secret":
        out = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return {**out, **(obj.get("stringData") or {})}
    return dict(obj.get("data") or {})


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict, init: bool = True) -> list[dict]:
    pod = _pod(workload)
    return (pod.get("initContainers", []) if init else []) + pod["containers"]


def _main(workload: dict) -> dict:
    return _pod(workload)["containers"][0]


def _serving(docs: list[dict]) -> dict:
    return _one(docs, "Deployment", "tailor")


def _worker(docs: list[dict]) -> dict:
    return _one(docs, "Deployment", "tailor-worker")


def _by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _env(docs: list[dict], container: dict) -> dict[str, str]:
    """The environment a container starts with (envFrom in order, then env)."""
    objs = _by_name(docs)
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
        env.update({(src.get("prefix") or "") + k: v for k, v in _data(objs[(kind, ref["name"])]).items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            kind, ref = ("ConfigMap", vf["configMapKeyRef"]) if "configMapKeyRef" in vf else ("Secret", vf.get("secretKeyRef"))
            if ref is not None:
                env[e["name"]] = _data(objs[(kind, ref["name"])])[ref["key"]]
    return env


def _gpu_limit(container: dict):
    return (container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")


def _quantity(q) -> float:
    """A Kubernetes CPU/memory quantity as a number (cores or bytes)."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


# --- schema validation ----------------------------------------------------------------------

def test_kubernetes_validate_knows_the_target_version():
    from kubernetes_validate import utils

    assert utils.major_minor(utils.latest_version()) >= utils.major_minor(K8S_VERSION), (
        f"kubernetes-validate {utils.latest_version()} has no schemas for Kubernetes {K8S_VERSION}: "
        "pip install -U kubernetes-validate")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_for_kubernetes(rendered, overlay):
    from kubernetes_validate import utils

    errors = []
    for doc in rendered[overlay]:
        try:
            utils.validate(doc, K8S_VERSION, strict=True)
        except utils.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")
        except utils.SchemaNotFoundError:
            errors.append(f"{doc['kind']} {doc['apiVersion']} ({doc['metadata']['name']}) is not a "
                          f"Kubernetes {K8S_VERSION} API")
    assert not errors, "\n".join(errors)
    # namespace-agnostic: `kubectl apply -k ... -n NS` (or an overlay's `namespace:`) decides
    assert not [d["metadata"]["name"] for d in rendered[overlay] if d["metadata"].get("namespace")]


def test_strict_validation_catches_a_misspelt_field():
    from kubernetes_validate import utils

    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"selectr": {"a": "b"}, "ports": [{"port": 80}]}}
    with pytest.raises(utils.ValidationError):
        utils.validate(bad, K8S_VERSION, strict=True)


# --- serving pods ---------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_probes_command_and_metrics(rendered, overlay):
    dep = _serving(rendered[overlay])
    c = _main(dep)
    assert c["command"][:2] == ["bentoml", "serve"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"http": 3000}
    ready, live, start = c["readinessProbe"], c["livenessProbe"], c["startupProbe"]
    assert ready["httpGet"]["path"] == "/readyz" and live["httpGet"]["path"] == "/healthz"
    assert start["httpGet"]["path"] == "/healthz"
    for probe in (ready, live, start):
        assert port.get(probe["httpGet"]["port"], probe["httpGet"]["port"]) == 3000
    # model load: the startup probe allows minutes before liveness may restart the container
    assert start["periodSeconds"] * start["failureThreshold"] >= 120
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == "3000" and ann["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_env_is_what_the_service_needs(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    dep = _serving(docs)
    c = _main(dep)
    env = _env(docs, c)
    assert env["TAILOR_TRAIN_WORKERS"] == "0", "training belongs to the worker Deployment"
    assert env["TAILOR_WORKERS"] == "1", "one cache per pod, or tenant affinity splits across workers"
    # every value is one the service accepts (storage URLs swapped for local ones: the
    # settings check only their syntax, and S3 support is another module's business)
    from service.settings import Settings

    check = {k: v for k, v in env.items() if k.startswith("TAILOR_")}
    check.update(TAILOR_HOME=str(tmp_path), TAILOR_ADMIN_KEY="k" * 24,
                 TAILOR_DATABASE_URL=f"sqlite:///{tmp_path}/t.db", TAILOR_STORE_URL=f"file://{tmp_path}/s")
    s = Settings.from_env(check, admin_key=False)
    assert (s.train_workers, s.workers) == (0, 1)
    # the ingress lets the largest upload through
    ingress = _one(docs, "Ingress", "tailor")
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    m = re.fullmatch(r"(\d+)([kmg]?)", body.lower())
    assert m, f"proxy-body-size {body!r} is not an NGINX size"
    assert int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ") >= s.max_upload_bytes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_and_hpa_select_the_serving_pods(rendered, overlay):
    docs = rendered[overlay]
    dep = _serving(docs)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == SERVING
    assert SERVING.items() <= labels.items()
    worker_labels = _worker(docs)["spec"]["template"]["metadata"]["labels"]

    pdb = _one(docs, "PodDisruptionBudget", "tailor")
    sel = pdb["spec"]["selector"]["matchLabels"]
    assert sel.items() <= labels.items() and not sel.items() <= worker_labels.items()
    assert pdb["spec"]["minAvailable"] == 1

    hpa = _one(docs, "HorizontalPodAutoscaler", "tailor")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    metric = hpa["spec"]["metrics"][0]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    # utilization is relative to the requests: every serving container must request CPU
    assert all("cpu" in c["resources"]["requests"] for c in _containers(dep, init=False))
    # the autoscaler owns the replica count: a Deployment value would reset it on every apply
    assert "replicas" not in dep["spec"]
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]

    svc = _one(docs, "Service", "tailor")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert not svc["spec"]["selector"].items() <= worker_labels.items()


# --- ingress ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_hashes_tenants_to_pods(rendered, overlay):
    docs = rendered[overlay]
    ing = _one(docs, "Ingress", "tailor")
    annotations = ing["metadata"].get("annotations", {})
    assert annotations.get("nginx.ingress.kubernetes.io/upstream-hash-by") == "$http_authorization"
    assert ing["spec"]["ingressClassName"] == "nginx"
    paths = {}
    for rule in ing["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            backend = p["backend"]["service"]
            svc = _one(docs, "Service", backend["name"])
            assert backend["port"]["name"] in {sp["name"] for sp in svc["spec"]["ports"]}
            paths[p["path"]] = p["pathType"]
    assert paths.get("/v1") == "Prefix"
    # health and metrics endpoints are for the cluster, not the internet
    assert not {"/", "/metrics", "/healthz", "/readyz"} & set(paths)


# --- GPU and CPU ----------------------------------------------------------------------------

def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes(rendered):
    docs = rendered["gpu"]
    dep = _serving(docs)
    c = _main(dep)
    assert str(_gpu_limit(c)) == "1"
    assert c["image"] == "tailor:latest-gpu"
    pod = _pod(dep)
    assert pod.get("nodeSelector") and any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))


@pytest.mark.parametrize("overlay", ["cpu", "self-contained"])
def test_cpu_overlays_ask_for_no_gpu(rendered, overlay):
    docs = rendered[overlay]
    for w in _workloads(docs):
        for c in _containers(w):
            assert _gpu_limit(c) is None and "nvidia.com/gpu" not in (c.get("resources", {}).get("requests") or {})
    assert _main(_serving(docs))["image"] == "tailor:latest"


def test_image_is_overridable_with_kustomize_images(kustomize, tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
        "images": [{"name": "tailor", "newName": "registry.example.com/ml/tailor", "newTag": "1.2.3-gpu"}],
    }))
    docs = _build(kustomize, tmp_path)
    tailor = [c["image"] for d in (_serving(docs), _worker(docs)) for c in _containers(d)]
    assert tailor and set(tailor) == {"registry.example.com/ml/tailor:1.2.3-gpu"}


# --- worker ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_runs_tailor_worker(rendered, overlay):
    docs = rendered[overlay]
    w = _worker(docs)
    c = _main(w)
    assert c.get("command", []) + c.get("args", []) == ["tailor", "worker"]
    assert c["image"] == _main(_serving(docs))["image"], "one image serves both"
    assert _pod(w)["terminationGracePeriodSeconds"] >= 60
    env = _env(docs, c)
    assert "TAILOR_TRAIN_WORKERS" not in env or env["TAILOR_TRAIN_WORKERS"] != "0"
    for key in ("TAILOR_DATABASE_URL", "TAILOR_STORE_URL", "TAILOR_HOME"):
        assert key in env
    # torch threads = the CPU the container may use (torch would start one per node core)
    assert _quantity(env["TAILOR_TRAIN_THREADS"]) == _quantity(c["resources"]["limits"]["cpu"])


# --- references and names -------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_config_and_secret_exists(rendered, overlay):
    docs = rendered[overlay]
    objs = _by_name(docs)
    missing = []
    for w in _workloads(docs):
        where = f"{w['kind']}/{w['metadata']['name']}"
        for c in _containers(w):
            for src in c.get("envFrom", []):
                kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
                if (kind, ref["name"]) not in objs and not ref.get("optional"):
                    missing.append(f"{where} {c['name']}: envFrom {kind} {ref['name']}")
            for e in c.get("env", []):
                vf = e.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in vf and not vf[key].get("optional"):
                        ref = vf[key]
                        obj = objs.get((kind, ref["name"]))
                        if obj is None or ref["key"] not in _data(obj):
                            missing.append(f"{where} {c['name']}: {e['name']} <- {kind} {ref['name']}[{ref['key']}]")
        for v in _pod(w).get("volumes", []):
            for kind, key, field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                if key in v and (kind, v[key][field]) not in objs:
                    missing.append(f"{where}: volume {v['name']} <- {kind} {v[key][field]}")
    assert not missing, "\n".join(missing)


def _settings_names() -> set[str]:
    source = (ROOT / "service" / "settings.py").read_text()
    return set(re.findall(r"""["'](TAILOR_[A-Z0-9_]+)["']""", source))


def test_settings_names_are_found():
    names = _settings_names()
    assert {"TAILOR_HOME", "TAILOR_TRAIN_WORKERS", "TAILOR_DATABASE_URL", "TAILOR_STORE_URL"} <= names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tailor_variable_is_one_the_service_reads(rendered, overlay):
    known = _settings_names()
    unknown = []
    for d in rendered[overlay]:
        if d["kind"] in ("ConfigMap", "Secret"):
            keys = list(_data(d))
        elif d in _workloads(rendered[overlay]):
            keys = [e["name"] for c in _containers(d) for e in c.get("env", [])]
        else:
            continue
        unknown += [f"{d['kind']}/{d['metadata']['name']}: {k}" for k in keys
                    if k.startswith("TAILOR_") and k not in known]
    assert not unknown, "not read by service/settings.py (typo?):\n" + "\n".join(unknown)


# --- security -------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_on_read_only_filesystems(rendered, overlay):
    docs = rendered[overlay]
    for w in _workloads(docs):
        pod = _pod(w)
        where = f"{w['kind']}/{w['metadata']['name']}"
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        # images whose USER is a name (bentoml) or root: the kubelet needs a numeric uid
        assert isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0, where
        assert pod.get("automountServiceAccountToken") is False, where
        for c in _containers(w):
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, f"{where} {c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where} {c['name']}"
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where} {c['name']}"
            assert "memory" in res.get("limits", {}), f"{where} {c['name']}"
    # the Tailor containers write only to mounted volumes
    for w in (_serving(docs), _worker(docs)):
        c = _main(w)
        env = _env(docs, c)
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        for var in ("TAILOR_HOME", "BENTOML_HOME", "HOME"):
            assert any(env[var] == m or env[var].startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{w['metadata']['name']}: {var}={env[var]} is not on a mounted volume")
        assert "/tmp" in mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_placeholder_secrets_stop_the_pods(rendered, overlay):
    docs = rendered[overlay]
    secret = _generated(docs, "Secret", "tailor-secrets")
    values = _data(secret)
    for key in ("TAILOR_ADMIN_KEY", "TAILOR_DATABASE_URL", "TAILOR_STORE_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"):
        assert key in values
    assert PLACEHOLDER in values["TAILOR_ADMIN_KEY"], "the committed admin key must be a marked placeholder"
    for w in _workloads(docs):
        uses_secret = any(secret["metadata"]["name"] in json.dumps(c.get("env", []) + c.get("envFrom", []))
                          for c in _containers(w))
        if not uses_secret or w["kind"] == "Job":
            continue
        guards = [c for c in _pod(w).get("initContainers", []) if c["name"] == "check-secrets"]
        assert guards, f"{w['kind']}/{w['metadata']['name']} starts without checking for placeholders"
        script = " ".join(guards[0]["command"])
        assert PLACEHOLDER in script and "exit 1" in script
    for job in [w for w in _workloads(docs) if w["kind"] == "Job"]:
        assert PLACEHOLDER in json.dumps(_main(job)["command"])


def test_placeholder_guard_script(rendered, tmp_path):
    """The init container's script fails on a placeholder, passes otherwise, and never prints values."""
    script = _pod(_serving(rendered["cpu"]))["initContainers"][0]["command"][2]
    sh = shutil.which("sh")
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    bad = subprocess.run([sh, "-c", script], env={**base_env, "TAILOR_ADMIN_KEY": "CHANGE-ME-x", "S": "s3cret"},
                         capture_output=True, text=True, timeout=10)
    assert bad.returncode == 1 and "TAILOR_ADMIN_KEY" in bad.stderr and "CHANGE-ME-x" not in bad.stderr
    good = subprocess.run([sh, "-c", script], env={**base_env, "TAILOR_ADMIN_KEY": "a" * 20},
                          capture_output=True, text=True, timeout=10)
    assert good.returncode == 0, good.stderr


# --- self-contained: PostgreSQL and MinIO ---------------------------------------------------

def test_self_contained_wires_postgres_and_minio(rendered):
    docs = rendered["self-contained"]
    values = _data(_generated(docs, "Secret", "tailor-secrets"))

    pg = _one(docs, "StatefulSet", "tailor-postgres")
    pg_svc = _one(docs, "Service", pg["spec"]["serviceName"])
    url = urlsplit(values["TAILOR_DATABASE_URL"])
    assert url.scheme == "postgresql+psycopg"
    assert url.hostname == pg_svc["metadata"]["name"]
    assert url.port == pg_svc["spec"]["ports"][0]["port"] == 5432
    pg_env = _env(docs, _main(pg))
    assert url.password == pg_env["POSTGRES_PASSWORD"], "the URL's password must be POSTGRES_PASSWORD"
    assert url.username == pg_env["POSTGRES_USER"] and url.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert pg["spec"]["volumeClaimTemplates"], "PostgreSQL needs a persistent volume"

    minio = _one(docs, "StatefulSet", "tailor-minio")
    store = urlsplit(values["TAILOR_STORE_URL"])
    endpoint = urlsplit(parse_qs(store.query)["endpoint_url"][0])
    minio_svc = _one(docs, "Service", minio["spec"]["serviceName"])
    assert store.scheme == "s3" and store.netloc
    assert endpoint.hostname == minio_svc["metadata"]["name"]
    assert endpoint.port == minio_svc["spec"]["ports"][0]["port"]
    m_env = _env(docs, _main(minio))
    assert (m_env["MINIO_ROOT_USER"], m_env["MINIO_ROOT_PASSWORD"]) == (
        values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
    assert minio["spec"]["volumeClaimTemplates"], "MinIO needs a persistent volume"
    job = _one(docs, "Job", "tailor-minio-bucket")
    assert "TAILOR_STORE_URL" in _env(docs, _main(job)) and "mc mb" in _main(job)["command"][-1]

    # third-party images are pinned: a tag, never `latest`
    for w in (pg, minio, job):
        for c in _containers(w):
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest", c["image"]
    assert _main(pg)["image"].startswith("postgres:16")
    assert _main(minio)["image"].startswith("minio/minio:")


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_external_overlays_have_no_database_or_object_store(rendered, overlay):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered[overlay]}
    assert ("StatefulSet", "tailor-postgres") not in kinds and ("StatefulSet", "tailor-minio") not in kinds


# --- bentofiles -----------------------------------------------------------------------------

def test_bentofiles_cpu_and_gpu_build_the_same_bento():
    cpu = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((ROOT / "deploy" / "bentofile-gpu.yaml").read_text())
    for key in ("service", "include", "exclude", "python", "envs"):
        assert cpu.get(key) == gpu.get(key), f"bentofile.yaml and deploy/bentofile-gpu.yaml differ in {key}"
    assert cpu["python"].get("lock_packages") is False
    assert "cuda_version" not in cpu["docker"] and str(gpu["docker"]["cuda_version"]).startswith("12")
    for bf in (cpu, gpu):
        # BentoML 1.4 ignores docker.env for new-style services: the image env is `envs`
        assert "env" not in bf["docker"]
        assert {e["name"] for e in bf["envs"]} >= {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
        script = ROOT / bf["docker"]["setup_script"]
        assert script.is_file() and script.stat().st_mode & stat.S_IXUSR, f"{script} must be executable"
        assert "/usr/local/bin/tailor" in script.read_text()


def test_bentofiles_parse_as_bentoml_build_configs():
    from bentoml._internal.bento.build_config import BentoBuildConfig

    for path in (ROOT / "bentofile.yaml", ROOT / "deploy" / "bentofile-gpu.yaml"):
        with path.open() as f:
            cfg = BentoBuildConfig.from_yaml(f)
        assert cfg.docker.distro == "debian" and cfg.docker.python_version == "3.11"
    assert cfg.docker.cuda_version and cfg.docker.cuda_version.startswith("12.")
