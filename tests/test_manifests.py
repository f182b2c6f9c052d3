"""Offline checks of the deployment files: cluster/*.yaml and the Dockerfile.

* RayCluster / RayJob documents are validated against the KubeRay CRDs' openAPIV3Schema
  (``shared/kuberay-crds`` beside the repository; the schema tests skip when it is absent).
  Validation is strict about unknown fields, as ``kubectl apply`` (strict field validation) is.
  The CRDs' CEL rules (``x-kubernetes-validations``) are not evaluated.
* A few rules that KubeRay's operator enforces beyond the schema are checked too.
* Every ``python -m jobs.X`` named in a manifest, cluster/README.md or the Dockerfile must be an
  existing module of the repository.
* Deliberately broken copies must fail, so these tests can fail.

Pure and fast: no Kubernetes, Docker or Ray needed.
"""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
DOCKERFILE = REPO / "Dockerfile"
# CI clones the repository with shared/ beside it: <parent>/shared/kuberay-crds.
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

EXPECTED_MANIFESTS = ("raycluster.yaml", "rayjob-doctor.yaml", "rayjob-world.yaml")
SHARED_MOUNT = "/mnt/shared"
JOB_MODULE_RE = re.compile(r"\bpython3?\s+-m\s+(jobs(?:\.[A-Za-z_]\w*)+)")
DNS1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# KubeRay derives pod/service names from these; it rejects longer RayJob names (47) and
# RayCluster names over 63. Stay well inside both.
MAX_NAME_LEN = 40

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------------------------
# helpers


def _manifest_files() -> list[Path]:
    return sorted(CLUSTER_DIR.glob("*.yaml")) + sorted(CLUSTER_DIR.glob("*.yml"))


def _load_documents() -> list[tuple[str, int, dict]]:
    docs = []
    for path in _manifest_files():
        with path.open() as fh:
            for i, doc in enumerate(yaml.safe_load_all(fh)):
                if doc is not None:
                    docs.append((path.name, i, doc))
    return docs


def _docs_of_kind(kind: str) -> list[tuple[str, int, dict]]:
    return [d for d in _load_documents() if d[2].get("kind") == kind]


def _cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster, or the embedded one of a RayJob."""
    spec = doc["spec"]
    return spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec


def _strict(schema):
    """Copy of a structural schema that rejects unknown fields.

    Kubernetes prunes unknown fields of a CRD object silently (and kubectl's strict field
    validation rejects them), while plain JSON-schema validation ignores them. Every object
    schema that lists its ``properties`` and says nothing of extra keys gets
    ``additionalProperties: false``; maps (``additionalProperties`` given) and
    ``x-kubernetes-preserve-unknown-fields`` objects keep accepting anything.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _require_crds() -> None:
    # CI always lays shared/ beside the clone: there a missing schema is a failure, not a skip.
    give_up = pytest.fail if os.environ.get("CI") else pytest.skip
    if not CRD_DIR.is_dir():
        give_up(
            f"KubeRay CRD schemas not found at {CRD_DIR} (expected shared/kuberay-crds beside "
            "the repository); schema validation skipped"
        )
    missing = [f for f in CRD_FILES.values() if not (CRD_DIR / f).is_file()]
    if missing:
        give_up(f"KubeRay CRD files missing from {CRD_DIR}: {missing}")


@cache
def _validator(kind: str, api_version: str):
    """A jsonschema validator for `kind` at `api_version` (e.g. ray.io/v1), or None if the CRD
    does not serve that version."""
    import jsonschema

    with (CRD_DIR / CRD_FILES[kind]).open() as fh:
        crd = yaml.load(fh, Loader=_Loader)
    group, _, version = api_version.partition("/")
    if group != crd["spec"]["group"]:
        return None
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served", True):
            schema = _strict(v["schema"]["openAPIV3Schema"])
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
            cls.check_schema(schema)
            return cls(schema)
    return None


def _schema_errors(doc: dict) -> list[str]:
    validator = _validator(doc["kind"], doc["apiVersion"])
    assert validator is not None, (
        f"{doc['kind']} apiVersion {doc['apiVersion']!r} is not served by the CRD"
    )
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return ["/".join(str(p) for p in e.absolute_path) + ": " + e.message for e in errors]


def _job_modules(text: str) -> list[str]:
    return JOB_MODULE_RE.findall(text)


def _module_exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (REPO / rel.with_suffix(".py")).is_file() or (REPO / rel / "__main__.py").is_file()


def _groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    return groups


# --------------------------------------------------------------------------------------------
# the files are there and parse


def test_expected_manifests_exist_and_parse():
    names = {p.name for p in _manifest_files()}
    for name in EXPECTED_MANIFESTS:
        assert name in names, f"cluster/{name} is missing"
    docs = _load_documents()
    assert docs, "no YAML documents in cluster/"
    for fname, i, doc in docs:
        assert isinstance(doc, dict), f"{fname}[{i}] is not a mapping"
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{fname}[{i}] has no {key}"
        assert doc["metadata"].get("name"), f"{fname}[{i}] has no metadata.name"
    kinds = [d[2]["kind"] for d in docs]
    assert "RayCluster" in kinds and kinds.count("RayJob") >= 2, kinds


# --------------------------------------------------------------------------------------------
# CRD schema validation


def _ray_docs():
    return [d for d in _load_documents() if d[2].get("kind") in CRD_FILES]


@pytest.mark.parametrize(
    "fname,index,doc", _ray_docs(), ids=[f"{f}[{i}]" for f, i, _ in _ray_docs()]
)
def test_manifest_matches_kuberay_crd(fname, index, doc):
    _require_crds()
    assert doc["apiVersion"] == "ray.io/v1", f"{fname}: use apiVersion ray.io/v1"
    errors = _schema_errors(doc)
    assert not errors, f"{fname}[{index}] violates the {doc['kind']} CRD:\n" + "\n".join(errors)


def _raycluster_doc() -> dict:
    docs = _docs_of_kind("RayCluster")
    assert docs, "no RayCluster in cluster/*.yaml"
    return copy.deepcopy(docs[0][2])


def _rayjob_doc() -> dict:
    docs = _docs_of_kind("RayJob")
    assert docs, "no RayJob in cluster/*.yaml"
    return copy.deepcopy(docs[0][2])


def _break_no_head(d):
    del d["spec"]["headGroupSpec"]


def _break_max_replicas_type(d):
    d["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"


def _break_ray_start_param_not_string(d):
    d["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _break_workers_not_a_list(d):
    d["spec"]["workerGroupSpecs"] = d["spec"]["workerGroupSpecs"][0]


def _break_missing_group_name(d):
    del d["spec"]["workerGroupSpecs"][0]["groupName"]


def _break_container_without_name(d):
    del d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]


def _break_typo_field(d):
    d["spec"]["workerGroupSpecs"][0]["maxReplica"] = d["spec"]["workerGroupSpecs"][0].pop(
        "maxReplicas"
    )


def _break_unknown_spec_field(d):
    d["spec"]["headGroupSpecs"] = d["spec"]["headGroupSpec"]


def _break_bad_quantity(d):
    container = d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container.setdefault("resources", {}).setdefault("limits", {})["memory"] = "16 gigs"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_no_head,
        _break_max_replicas_type,
        _break_ray_start_param_not_string,
        _break_workers_not_a_list,
        _break_missing_group_name,
        _break_container_without_name,
        _break_typo_field,
        _break_unknown_spec_field,
        _break_bad_quantity,
    ],
)
def test_broken_raycluster_fails_validation(breaker):
    _require_crds()
    doc = _raycluster_doc()
    assert not _schema_errors(doc)  # the intact copy passes ...
    breaker(doc)
    assert _schema_errors(doc), f"{breaker.__name__}: a broken RayCluster passed validation"


def _break_job_bool_type(d):
    d["spec"]["shutdownAfterJobFinishes"] = "yes"


def _break_job_ttl_type(d):
    d["spec"]["ttlSecondsAfterFinished"] = "5m"


def _break_job_embedded_cluster(d):
    del d["spec"]["rayClusterSpec"]["headGroupSpec"]


@pytest.mark.parametrize(
    "breaker", [_break_job_bool_type, _break_job_ttl_type, _break_job_embedded_cluster]
)
def test_broken_rayjob_fails_validation(breaker):
    _require_crds()
    doc = _rayjob_doc()
    assert not _schema_errors(doc)
    breaker(doc)
    assert _schema_errors(doc), f"{breaker.__name__}: a broken RayJob passed validation"


# --------------------------------------------------------------------------------------------
# rules KubeRay's operator enforces beyond the schema, and project conventions


def _dockerfile_ray_version() -> str:
    m = re.search(
        r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)\S*", DOCKERFILE.read_text(), re.MULTILINE
    )
    assert m, "Dockerfile must build FROM rayproject/ray:<x.y.z>-..."
    return m.group(1)


@pytest.mark.parametrize(
    "fname,index,doc", _ray_docs(), ids=[f"{f}[{i}]" for f, i, _ in _ray_docs()]
)
def test_cluster_spec_conventions(fname, index, doc):
    name = doc["metadata"]["name"]
    assert DNS1035_RE.match(name) and len(name) <= MAX_NAME_LEN, (
        f"{fname}: metadata.name {name!r} must be a DNS-1035 label of <= {MAX_NAME_LEN} chars"
    )
    spec = _cluster_spec(doc)
    assert spec.get("rayVersion") == _dockerfile_ray_version(), (
        f"{fname}: rayVersion {spec.get('rayVersion')!r} differs from the Dockerfile's Ray"
    )
    assert spec.get("workerGroupSpecs"), f"{fname}: no worker group"
    group_names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(group_names)) == len(group_names), f"{fname}: duplicate group names"

    for gname, group in _groups(spec):
        params = group.get("rayStartParams", {})
        assert "labels" not in params, f"{fname}/{gname}: use the group's labels field"
        uses_params = any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
        assert not (uses_params and group.get("resources")), (
            f"{fname}/{gname}: resources set in both rayStartParams and resources"
        )
        if gname != "head":
            lo, hi = group["minReplicas"], group["maxReplicas"]
            assert 0 <= lo <= group.get("replicas", lo) <= hi, f"{fname}/{gname}: replicas"
        pod = group["template"]["spec"]
        containers = pod["containers"]
        assert containers, f"{fname}/{gname}: no container"
        # Run directories go to the shared volume: every Ray container mounts it.
        mounts = {m["mountPath"] for m in containers[0].get("volumeMounts", [])}
        assert SHARED_MOUNT in mounts, f"{fname}/{gname}: {SHARED_MOUNT} not mounted"
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for m in containers[0].get("volumeMounts", []):
            assert m["name"] in volumes, f"{fname}/{gname}: mount of undeclared volume {m['name']}"

    images = {c["image"] for _, g in _groups(spec) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"{fname}: head and workers should run one image, got {images}"


AUTH_SECRET = "emergent-ray-auth"
SECRET_NAME_RE = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def _secret_problems(doc: dict) -> list[str]:
    """Token auth off or a secret written into the manifest: what ``doc`` does wrong."""
    spec = _cluster_spec(doc)
    problems = []
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token" or auth.get("secretName") != AUTH_SECRET:
        problems.append(f"authOptions {auth!r}: want mode token from Secret {AUTH_SECRET}")
    for gname, group in _groups(spec):
        for c in group["template"]["spec"]["containers"]:
            for env in c.get("env", []):
                if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                    problems.append(f"{gname}: RAY_AUTH_MODE={env.get('value')!r}")
                if SECRET_NAME_RE.search(env["name"]) and "value" in env:
                    problems.append(f"{gname}: {env['name']} written in the manifest")
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if SECRET_NAME_RE.search(env["name"]) and "value" not in env and not ref:
                    problems.append(f"{gname}: {env['name']} not from a Secret")
    return problems


@pytest.mark.parametrize(
    "fname,index,doc", _ray_docs(), ids=[f"{f}[{i}]" for f, i, _ in _ray_docs()]
)
def test_token_auth_is_on_and_secrets_come_from_kubernetes_secrets(fname, index, doc):
    assert _secret_problems(doc) == [], fname
    # ... and a copy that turns auth off, or writes a token into the manifest, is caught
    off = copy.deepcopy(doc)
    _cluster_spec(off)["authOptions"]["mode"] = "disabled"
    assert _secret_problems(off)
    leak = copy.deepcopy(doc)
    head = _cluster_spec(leak)["headGroupSpec"]["template"]["spec"]["containers"][0]
    head.setdefault("env", []).append({"name": "RAY_AUTH_TOKEN", "value": "0123abcd"})
    assert _secret_problems(leak) == ["head: RAY_AUTH_TOKEN written in the manifest"]


def test_raycluster_has_gpu_worker_group_and_autoscaling():
    spec = _raycluster_doc()["spec"]
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if str(
            g["template"]["spec"]["containers"][0]
            .get("resources", {})
            .get("limits", {})
            .get("nvidia.com/gpu", 0)
        )
        not in ("0", "")
    ]
    assert gpu_groups, "raycluster.yaml needs a worker group with nvidia.com/gpu limits"


@pytest.mark.parametrize(
    "fname,index,doc",
    _docs_of_kind("RayJob"),
    ids=[f"{f}[{i}]" for f, i, _ in _docs_of_kind("RayJob")],
)
def test_rayjob_conventions(fname, index, doc):
    spec = doc["spec"]
    assert spec.get("rayClusterSpec"), f"{fname}: embed a rayClusterSpec"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{fname}: shut the cluster down"
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    assert isinstance(ttl, int) and ttl >= 0
    assert spec.get("activeDeadlineSeconds", 1) > 0
    entrypoint = spec.get("entrypoint", "")
    assert _job_modules(entrypoint), f"{fname}: entrypoint should run `python -m jobs.<job>`"
    # KubeRay splices the entrypoint into a shell command line: keep it a plain command.
    assert not re.search(r"[;&|`$<>]", entrypoint), f"{fname}: shell syntax in the entrypoint"
    assert f"run.root={SHARED_MOUNT}/" in entrypoint, (
        f"{fname}: the cluster is deleted afterwards; write runs under {SHARED_MOUNT}"
    )


def test_persistent_volume_claims_are_declared():
    docs = _load_documents()
    declared = {
        d["metadata"]["name"] for _, _, d in docs if d.get("kind") == "PersistentVolumeClaim"
    }
    for fname, _, doc in docs:
        if doc.get("kind") not in CRD_FILES:
            continue
        for gname, group in _groups(_cluster_spec(doc)):
            for vol in group["template"]["spec"].get("volumes", []):
                claim = vol.get("persistentVolumeClaim", {}).get("claimName")
                if claim:
                    assert claim in declared, (
                        f"{fname}/{gname}: PVC {claim!r} is not declared in cluster/*.yaml"
                    )
    for _, _, d in docs:
        if d.get("kind") == "PersistentVolumeClaim":
            assert d["apiVersion"] == "v1"
            assert "ReadWriteMany" in d["spec"]["accessModes"], "shared runs need RWX"


# --------------------------------------------------------------------------------------------
# referenced job modules exist


def _files_naming_jobs() -> list[Path]:
    files = _manifest_files() + [DOCKERFILE]
    readme = CLUSTER_DIR / "README.md"
    if readme.is_file():
        files.append(readme)
    return files


def test_job_module_regex():
    assert _job_modules("entrypoint: python -m jobs.doctor --set a=b") == ["jobs.doctor"]
    assert _job_modules("python3 -m jobs.world --config configs/toy.yaml") == ["jobs.world"]
    assert _job_modules('CMD ["python", "-m", "jobs.doctor"]') == []  # exec form: see below
    assert _job_modules("python -m jobs.<job>") == []
    assert not _module_exists("jobs.no_such_job_xyz")


def _dockerfile_exec_form_modules(text: str) -> list[str]:
    return re.findall(r'"-m",\s*"(jobs(?:\.[A-Za-z_]\w*)+)"', text)


def test_referenced_job_modules_exist():
    referenced: dict[str, set[str]] = {}
    for path in _files_naming_jobs():
        text = path.read_text()
        mods = _job_modules(text)
        if path == DOCKERFILE:
            mods += _dockerfile_exec_form_modules(text)
        for mod in mods:
            referenced.setdefault(mod, set()).add(path.relative_to(REPO).as_posix())
    assert {"jobs.doctor", "jobs.world"} <= set(referenced), referenced
    missing = {mod: sorted(where) for mod, where in referenced.items() if not _module_exists(mod)}
    assert not missing, f"job modules referenced but not in the repository: {missing}"


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_essentials():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-gpu\s*$", text, re.MULTILINE)
    assert re.search(r"^WORKDIR /home/ray/emergent\s*$", text, re.MULTILINE)
    assert re.search(r"pip install --no-build-isolation\b.*-e \.", text)
    assert re.search(r"RAY_TRAIN_ENABLE_PRINT_PATCH=0", text)
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "HF_HUB_OFFLINE" in line], "leave HF_HUB_OFFLINE unset"
    # the optional vLLM layer: off unless asked for, and held to the torch / ray pins
    assert re.search(r'^ARG VLLM_VERSION=""\s*$', text, re.MULTILINE)
    assert re.search(r'pip install -c /home/ray/constraints.txt "vllm==\$\{VLLM_VERSION\}"', text)
    ignore = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", "runs", ".git"):
        assert entry in ignore, f".dockerignore should exclude {entry}"
