"""Every file in cluster/ is checked, and so is every sweep YAML.

What can be proven without a cloud account, a Kubernetes cluster or a GPU: the launcher configs
pass Ray's cluster config schema and Ray's own config checks; the KubeRay manifests use the
fields KubeRay reads, with the values that matter (a head that runs no tasks, a dashboard that
stays inside the cluster, GPU limits, autoscaling bounds); the RayJobs name files that exist, a
training config and a sweep that validate with their overrides, and ask for no more GPUs than
their worker groups hold; every pod and node sees the dataset folder; the runtime env is one
Ray accepts and uploads the code and nothing else; the image recipe installs what the cluster
needs, in an order that can build; and all these files agree on the image, the Ray version, the
auth mode and the MLflow server. No Ray cluster is started."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"

LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
RAY_CLUSTERS = ["kuberay/raycluster.yaml"]
RAY_JOBS = ["kuberay/rayjob-train.yaml", "kuberay/rayjob-sweep.yaml"]
MLFLOW_MANIFEST = "kuberay/mlflow.yaml"
RUNTIME_ENV = "runtime_env.yaml"
DOCKERFILE = "Dockerfile"
DOCKERIGNORE = "Dockerfile.dockerignore"
CHECKED = {
    *LAUNCHER_CONFIGS,
    *RAY_CLUSTERS,
    *RAY_JOBS,
    MLFLOW_MANIFEST,
    RUNTIME_ENV,
    DOCKERFILE,
    DOCKERIGNORE,
}
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))

# (CPUs, GPUs) of the instance types the launcher configs use: the resources a node type
# advertises to Ray must be the machine's (on GCP Ray does not detect them).
INSTANCE_RESOURCES = {
    "g5.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8),
    "g2-standard-8": (8, 1),
    "a2-highgpu-8g": (96, 8),
}

# Field names of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go): a misspelt
# field is dropped by the API server without a word, so every key we write must be one of these.
RAY_CLUSTER_SPEC_FIELDS = {
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "env",
    "envFrom",
    "volumeMounts",
}
RAY_JOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionPolicy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}
JOB_SCRIPTS = {"jobs/train.py", "jobs/tune.py"}


def load(rel: str) -> Any:
    return yaml.safe_load((CLUSTER / rel).read_text())


def load_all(rel: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / rel).read_text()) if doc is not None]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the standalone ones and those inside the RayJobs."""
    specs = [(rel, load(rel)["spec"]) for rel in RAY_CLUSTERS]
    specs += [(rel, load(rel)["spec"]["rayClusterSpec"]) for rel in RAY_JOBS]
    return specs


def all_pod_templates() -> list[tuple[str, dict]]:
    out = []
    for rel, spec in ray_cluster_specs():
        out.append((rel, spec["headGroupSpec"]["template"]))
        out += [(rel, g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [
        ln
        for ln in (CLUSTER / DOCKERFILE).read_text().splitlines()
        if not ln.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in text.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instr, rest in dockerfile_instructions():
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
    return args


def mlflow_service_url() -> str:
    (svc,) = [d for d in load_all(MLFLOW_MANIFEST) if d["kind"] == "Service"]
    return f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


# -- every file is covered -------------------------------------------------------------------


def test_every_file_in_cluster_is_checked():
    present = {
        str(p.relative_to(CLUSTER))
        for p in CLUSTER.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    unchecked = present - CHECKED
    assert not unchecked, f"add checks to {Path(__file__).name} for: {sorted(unchecked)}"
    assert not CHECKED - present, f"checked but missing: {sorted(CHECKED - present)}"


@pytest.mark.parametrize(
    "rel", sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")), ids=str
)
def test_yaml_parses(rel):
    docs = load_all(rel)
    assert docs and all(isinstance(d, dict) for d in docs), f"{rel}: expected mappings"


# -- the same image, Ray version and auth mode everywhere ----------------------------------


def test_one_image_name_everywhere():
    images = {rel: load(rel)["docker"]["image"] for rel in LAUNCHER_CONFIGS}
    for rel, template in all_pod_templates():
        for c in containers(template):
            images[f"{rel}:{c['name']}"] = c["image"]
    for doc in load_all(MLFLOW_MANIFEST):
        if doc["kind"] == "Deployment":
            for c in containers(doc["spec"]["template"]):
                images[f"{MLFLOW_MANIFEST}:{c['name']}"] = c["image"]
    assert len(set(images.values())) == 1, f"one image, so one name to replace: {images}"
    # The Dockerfile's header says how to build and push that very name.
    assert next(iter(images.values())) in (CLUSTER / DOCKERFILE).read_text()


def test_ray_version_matches_the_installed_ray():
    base = dockerfile_args()["RAY_IMAGE"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-cu\d+", base), base
    for rel, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__, rel


def test_auth_mode_is_set_explicitly_and_the_same_everywhere():
    # Ray 2.60: with RAY_AUTH_MODE unset, `ray start --head` turns token auth on when it finds
    # ~/.ray/auth_token, and a client without the same mode gets 401. The two values Ray knows:
    modes = set()
    for rel in LAUNCHER_CONFIGS:
        opts = " ".join(load(rel)["docker"]["run_options"])
        found = re.findall(r"RAY_AUTH_MODE=(\w+)", opts)
        assert len(found) == 1, f"{rel}: RAY_AUTH_MODE in docker.run_options"
        modes.add(found[0])
    for rel, template in all_pod_templates():
        for c in containers(template):
            assert "RAY_AUTH_MODE" in env_of(c), f"{rel}:{c['name']}"
            modes.add(env_of(c)["RAY_AUTH_MODE"])
    assert len(modes) == 1 and modes <= {"disabled", "token"}, modes


# -- Ray cluster launcher configs (ray up) ----------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_schema_and_checks(rel, ray_schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(rel)
    jsonschema.validate(config, ray_schema)
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, fill the
    # per-type bounds, check docker settings, validate again (schema and cross-field checks).
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_head_runs_no_tasks_and_keeps_the_dashboard_local(rel):
    config = load(rel)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise 0 CPUs"
    assert head["resources"].get("GPU", 0) == 0
    start = " ".join(config["head_start_ray_commands"])
    assert re.findall(r"--dashboard-host[= ](\S+)", start) == ["127.0.0.1"]
    text = (CLUSTER / rel).read_text()
    assert "0.0.0.0:8265" not in text and "--dashboard-host=0.0.0.0" not in text


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_gpu_workers_and_autoscaling_bounds(rel):
    config = load(rel)
    workers = {
        name: t
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    assert workers
    instance_key = "InstanceType" if config["provider"]["type"] == "aws" else "machineType"
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers", config["max_workers"])
        assert 0 <= lo <= hi <= config["max_workers"], name
        instance = t["node_config"][instance_key]
        assert instance in INSTANCE_RESOURCES, f"{name}: add {instance}'s CPUs and GPUs"
        cpus, gpus = INSTANCE_RESOURCES[instance]
        assert t["resources"] == {"CPU": cpus, "GPU": gpus}, name
        assert gpus >= 1
        assert "--gpus all" in t["docker"]["worker_run_options"], name
        if config["provider"]["type"] == "gcp":
            # GPU VMs cannot live-migrate: they must stop for host maintenance.
            assert {"onHostMaintenance": "TERMINATE"} in t["node_config"]["scheduling"], name
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_code_comes_with_the_job_and_deps_with_the_image(rel):
    config = load(rel)
    assert config["file_mounts"] == {}
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], f"{key}: the image holds the dependencies"


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_starts_mlflow_on_the_head_and_points_every_node_at_it(rel):
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    config = load(rel)
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head
    port = re.search(r"mlflow server.*?--port[= ](\d+)", head).group(1)
    assert re.search(r"--host[= ]0\.0\.0\.0", head), "workers log to it from other nodes"
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head
    assert f"MLFLOW_TRACKING_URI=http://$(hostname -I | awk '{{print $1}}'):{port}" in head
    workers = " ".join(config["worker_start_ray_commands"])
    assert f"MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port}" in workers
    # The tracking URI is exported in the same shell command that starts the raylet, whose
    # environment every driver and worker inherits.
    assert any(
        "MLFLOW_TRACKING_URI" in cmd and "ray start" in cmd
        for cmd in config["worker_start_ray_commands"]
    )
    # The store and artifacts are on a host folder mounted into the head's container (made
    # before Docker starts), so they outlive the container.
    volumes = re.findall(r"--volume (\S+)", " ".join(config["docker"]["head_run_options"]))
    init = " ".join(config["initialization_commands"])
    for flag in (r"--backend-store-uri sqlite:///", r"--artifacts-destination "):
        path = Path(re.search(flag + r"(\S+)", head).group(1))
        (host,) = [v.split(":")[0] for v in volumes if path.is_relative_to(v.split(":")[1])]
        assert f"mkdir -p {host}" in init, host
    # MLflow 3 checks the Host header: the workers reach the head by its private IP, which its
    # default allow-list accepts (no --allowed-hosts needed here, unlike on Kubernetes).
    assert "--allowed-hosts" not in head
    assert is_allowed_host_header(get_default_allowed_hosts(), f"10.0.12.34:{port}")


# -- KubeRay manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("rel", RAY_CLUSTERS + RAY_JOBS)
def test_kuberay_api_version_and_kind(rel):
    doc = load(rel)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == ("RayCluster" if rel in RAY_CLUSTERS else "RayJob")
    assert doc["metadata"]["name"]


@pytest.mark.parametrize(
    ("rel", "spec"), ray_cluster_specs(), ids=[r for r, _ in ray_cluster_specs()]
)
def test_kuberay_cluster_spec(rel, spec):
    assert set(spec) <= RAY_CLUSTER_SPEC_FIELDS, set(spec) - RAY_CLUSTER_SPEC_FIELDS
    assert spec["enableInTreeAutoscaling"] is True
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS_FIELDS
    assert spec["autoscalerOptions"]["upscalingMode"] in {"Default", "Aggressive", "Conservative"}

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    # rayStartParams is map[string]string: a YAML number would be refused by the API server.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must run no tasks"
    # The dashboard and job API stay inside the cluster: a ClusterIP service, no Ingress, no
    # LoadBalancer or NodePort service.
    assert head["serviceType"] == "ClusterIP"
    assert head.get("enableIngress", False) is False
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") in {"0.0.0.0", "127.0.0.1"}
    assert not any(
        "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
        for c in containers(head["template"])
    )

    groups = spec["workerGroupSpecs"]
    assert groups
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert set(g) <= WORKER_GROUP_FIELDS, set(g) - WORKER_GROUP_FIELDS
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        lo, hi = g["minReplicas"], g["maxReplicas"]
        assert 0 <= lo <= g.get("replicas", lo) <= hi and hi >= 1, g["groupName"]
        (c,) = containers(g["template"])
        limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
        gpus = int(limits["nvidia.com/gpu"])
        assert gpus >= 1, g["groupName"]
        # Kubernetes requires GPU requests equal to limits.
        assert int(requests.get("nvidia.com/gpu", gpus)) == gpus
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), g["groupName"]


def test_kuberay_pods_log_to_the_mlflow_service():
    url = mlflow_service_url()
    for rel, template in all_pod_templates():
        for c in containers(template):
            assert env_of(c).get("MLFLOW_TRACKING_URI") == url, f"{rel}:{c['name']}"


def _entrypoint(rel: str) -> list[str]:
    return shlex.split(load(rel)["spec"]["entrypoint"])


def _overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


@pytest.mark.parametrize("rel", RAY_JOBS)
def test_rayjob_spec(rel):
    spec = load(rel)["spec"]
    assert set(spec) <= RAY_JOB_SPEC_FIELDS, set(spec) - RAY_JOB_SPEC_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode"}
    assert isinstance(spec.get("ttlSecondsAfterFinished", 0), int)


@pytest.mark.parametrize("rel", RAY_JOBS)
def test_rayjob_entrypoint_names_files_that_exist(rel):
    argv = _entrypoint(rel)
    assert argv[0] == "python" and argv[1] in JOB_SCRIPTS, argv
    assert (REPO / argv[1]).is_file(), f"{argv[1]} is missing"
    config = REPO / argv[2]
    assert config.suffix == ".yaml" and config.is_file(), f"{rel}: {argv[2]} is missing"
    overrides = _overrides(argv)
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=\S+", o) for o in overrides), overrides
    # Multi-node: Ray Train's checkpoints (and Tune's state) must be on storage all nodes reach.
    storage = [o.partition("=")[2] for o in overrides if o.startswith("ray.storage_path=")]
    assert len(storage) == 1 and re.match(r"(s3|gs)://", storage[0]), storage


@pytest.mark.parametrize("rel", RAY_JOBS)
def test_rayjob_runtime_env_is_the_image_copy_of_the_repo(rel):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(load(rel)["spec"]["runtimeEnvYAML"])
    assert set(env) <= set(RuntimeEnv.known_fields)
    # Ray checks that a local working_dir exists: in the image it is the repository's copy.
    RuntimeEnv(**{**env, "working_dir": str(REPO)})
    workdir = [rest for instr, rest in dockerfile_instructions() if instr == "WORKDIR"][-1]
    assert env["working_dir"] == workdir


def _worker_slots(groups: list[dict], cpus: float, gpus: float) -> int:
    """How many Ray Train workers of (cpus, gpus) the worker groups hold at their largest."""
    slots = 0
    for g in groups:
        limits = containers(g["template"])[0]["resources"]["limits"]
        per_pod = min(float(limits["cpu"]) // cpus, float(limits["nvidia.com/gpu"]) // gpus)
        slots += g["maxReplicas"] * int(per_pod)
    return slots


def _train_job_config():
    from mblm.train.config import load_train_config

    argv = _entrypoint("kuberay/rayjob-train.yaml")
    assert argv[1] == "jobs/train.py"
    return load_train_config(REPO / argv[2], _overrides(argv))


def _sweep_job_config(overrides: bool = True):
    from mblm.tune.config import load_sweep_config
    from mblm.tune.space import load_base

    argv = _entrypoint("kuberay/rayjob-sweep.yaml")
    assert argv[1] == "jobs/tune.py"
    sweep = load_sweep_config(REPO / argv[2], _overrides(argv) if overrides else [])
    return sweep, load_base(sweep)


def test_rayjob_train_config_validates_and_fits_the_cluster():
    cfg = _train_job_config()
    assert cfg.ray.use_gpu, "a GPU cluster: the run must ask for GPUs"
    assert "://" in (cfg.ray.storage_path or "")
    groups = load("kuberay/rayjob-train.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    slots = _worker_slots(groups, cfg.ray.cpus_per_worker, cfg.ray.gpus_per_worker or 1)
    assert slots >= cfg.ray.num_workers, f"{cfg.ray.num_workers} workers, room for {slots}"


def test_rayjob_sweep_validates_and_its_trials_fit_the_cluster():
    sweep, base = _sweep_job_config()
    res = sweep.resources
    assert res.use_gpu, "a GPU cluster: the trials must ask for GPUs"
    # `--set ray.storage_path=...` reaches the training config every trial starts from.
    (storage,) = [
        o.partition("=")[2]
        for o in _overrides(_entrypoint("kuberay/rayjob-sweep.yaml"))
        if o.startswith("ray.storage_path=")
    ]
    assert base["ray"]["storage_path"] == storage
    groups = load("kuberay/rayjob-sweep.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    slots = _worker_slots(groups, res.cpus_per_worker, res.gpus_per_worker or 1)
    wanted = res.max_concurrent_trials * res.workers_per_trial
    assert slots >= wanted, f"{wanted} workers at once, room for {slots}"


def test_every_pod_and_node_sees_the_dataset():
    """The paper's configs read a local folder on every node (the driver counts windows from
    file sizes, the workers read them): every pod mounts it, every VM container sees it."""
    folders = {
        Path(_train_job_config().io.dataset_dir),
        Path(_sweep_job_config(overrides=False)[1]["io"]["dataset_dir"]),
    }
    for rel, template in all_pod_templates():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (c,) = containers(template)
        for folder in folders:
            mounts = [m for m in c["volumeMounts"] if folder.is_relative_to(m["mountPath"])]
            assert mounts, f"{rel}:{c['name']} does not mount {folder}"
            assert "persistentVolumeClaim" in volumes[mounts[0]["name"]], rel
    for rel in LAUNCHER_CONFIGS:
        opts = " ".join(load(rel)["docker"]["run_options"])
        targets = [Path(v.split(":")[1]) for v in re.findall(r"--volume (\S+)", opts)]
        for folder in folders:
            assert any(folder.is_relative_to(t) for t in targets), f"{rel}: {folder}"


def test_mlflow_manifest():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = {d["kind"]: d for d in load_all(MLFLOW_MANIFEST)}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    svc, dep = docs["Service"], docs["Deployment"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (c,) = containers(dep["spec"]["template"])
    args = dict(a.removeprefix("--").split("=", 1) for a in c["command"][2:])
    assert c["command"][:2] == ["mlflow", "server"]
    port = svc["spec"]["ports"][0]["port"]
    assert int(args["port"]) == svc["spec"]["ports"][0]["targetPort"] == port
    assert args["host"] == "0.0.0.0"
    claim = dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    # MLflow 3 rejects Host headers outside its allow-list: the Service's names (what the pods
    # use) and port-forwarded localhost must pass; anything else must not.
    allowed = args["allowed-hosts"].split(",")
    name = svc["metadata"]["name"]
    for host in (f"{name}:{port}", f"{name}.default.svc.cluster.local:{port}", f"localhost:{port}"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, f"attacker.example.com:{port}")


# -- runtime env ------------------------------------------------------------------------------


def test_runtime_env_has_only_known_keys():
    from ray.runtime_env import RuntimeEnv

    env = load(RUNTIME_ENV)
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    assert "working_dir" not in env, "it comes from --working-dir"
    assert "pip" not in env and "conda" not in env, "dependencies come from the image"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    RuntimeEnv(**env)


def test_runtime_env_uploads_the_code_and_nothing_else(tmp_path):
    """Package the checkout the way `ray job submit --working-dir . --runtime-env ...` does."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    env = parse_runtime_env_args(runtime_env=str(CLUSTER / RUNTIME_ENV), working_dir=str(REPO))
    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    seen: dict[str, Any] = {}

    def upload(working_dir, excludes, is_file=False):
        seen.update(working_dir=working_dir, excludes=excludes)

    upload_working_dir_if_needed(env, include_gitignore=include_gitignore, upload_fn=upload)
    package = tmp_path / "working_dir.zip"
    create_package(
        seen["working_dir"], package, include_gitignore=include_gitignore, excludes=seen["excludes"]
    )
    names = set(zipfile.ZipFile(package).namelist())
    assert {"jobs/train.py", "mblm/__init__.py", "configs/debug.yaml", "pyproject.toml"} <= names
    heavy = (".git/", ".venv/", ".venv-ref/", "outputs/", "mblm.egg-info/")
    assert not [n for n in names if n.startswith(heavy) or "__pycache__" in n]
    assert package.stat().st_size < 16 * 2**20


# -- the image recipe -------------------------------------------------------------------------


def test_dockerfile_installs_cuda_torch_then_kernels_then_the_project():
    instructions = dockerfile_instructions()
    args = dockerfile_args()
    assert instructions[0][0] == "ARG" and instructions[1] == ("FROM", "${RAY_IMAGE}")
    runs = [rest for instr, rest in instructions if instr == "RUN"]

    def first(pattern: str) -> int:
        hits = [i for i, r in enumerate(runs) if re.search(pattern, r)]
        assert hits, f"no RUN matches {pattern!r}"
        return hits[0]

    torch_run = first(r"pip install \"torch==\$\{TORCH_VERSION\}\"")
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in runs[torch_run]
    # The torch wheel's CUDA must not be newer than the base image's toolkit.
    base_cuda = int(re.search(r"-cu(\d+)$", args["RAY_IMAGE"]).group(1))
    assert int(re.fullmatch(r"cu(\d+)", args["TORCH_CUDA"]).group(1)) <= base_cuda
    # The Makefile's torch pin (CPU wheel) is the version the cluster runs too.
    pin = re.search(r"^TORCH_PIN := torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert pin and args["TORCH_VERSION"] == pin.group(1)

    # Every package of the `cuda` extra is built against that torch: --no-build-isolation.
    extra = _cuda_extra()
    assert extra == {"mamba-ssm", "causal-conv1d"}
    for pkg in extra:
        i = first(rf"--no-build-isolation \"{pkg}")
        assert torch_run < i
    project = first(r"pip install \"\.\[cuda\]\"")
    assert max(first(rf"--no-build-isolation \"{p}") for p in extra) < project

    copies = [rest for instr, rest in instructions if instr == "COPY"]
    workdir = [rest for instr, rest in instructions if instr == "WORKDIR"][-1]
    assert any(re.fullmatch(rf"(--chown=\S+ )?\. {re.escape(workdir)}/?", c) for c in copies)


def _cuda_extra() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~\[; ]", r)[0] for r in project["optional-dependencies"]["cuda"]}


def test_dockerignore_keeps_local_state_out_of_the_image():
    patterns = {
        ln.strip()
        for ln in (CLUSTER / DOCKERIGNORE).read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert {".git", ".venv", ".venv-ref", "outputs"} <= patterns


# -- sweeps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_yaml_validates(path):
    """Every sweep: its schema, its base training config with the sweep's `set` applied."""
    from mblm.tune.config import load_sweep_config
    from mblm.tune.space import load_base

    load_base(load_sweep_config(path))


def test_sweeps_exist():
    assert {p.name for p in SWEEPS} >= {"debug.yaml", "paper_2stage.yaml"}
