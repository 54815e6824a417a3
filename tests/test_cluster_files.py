"""The cluster files (cluster/), the run configs and the entry points the docs name, checked
offline: launcher YAMLs against Ray's own autoscaler schema and config preparation, image tags
against the installed Ray, KubeRay manifests for their structure, the RayJob's entry point and
dependencies against this repository, and every jobs/configs/*.yaml with the config validator."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from diffinf_ray.config import STAGES, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
FFHQ_CONFIGS = [REPO / "jobs" / "configs" / "ffhq_age.yaml",
                REPO / "jobs" / "configs" / "ffhq_expression.yaml"]
PACKAGE_MOUNT = "/home/ray/diffinf-ray"
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{3,})(?:-(?:gpu|cu\d+))?$")
GPU_INSTANCE = re.compile(r"^(g\d|p\d)")  # AWS GPU families: g4dn, g5, g6, p3, p4d, p5 ...


def _documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def _kind(path: Path, kind: str) -> dict:
    found = [d for d in _documents(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path}: expected one {kind}, found {len(found)}"
    return found[0]


def _check_image(image: str, where: str) -> None:
    match = IMAGE.match(image)
    assert match, f"{where}: image {image!r} is not a rayproject/ray:<version>-py<NNN>[-gpu] tag"
    assert match["ray"] == ray.__version__, (
        f"{where}: image Ray {match['ray']} != installed/pinned Ray {ray.__version__}")
    assert int(match["py"]) >= 311, f"{where}: Python {match['py']} < 3.11 (requires-python)"


def _check_job_config(path: Path) -> None:
    """A run config validates with load_config. An experiment spec (jobs.experiment: top-level
    `base`, a run config relative to it, plus seeds/tasks) has its base run config validated."""
    tree = yaml.safe_load(path.read_text()) or {}
    if "severities" in tree:  # a fairness study: its own loader validates its run settings
        from diffinf_ray.fairness.runner import load_fairness_config

        load_fairness_config(path)
        return
    if "base" in tree:
        base = path.parent / tree["base"]
        assert base.is_file(), f"{path}: base config {tree['base']} does not exist"
        path = base
    load_config(path)


def _pyproject_dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert set(LAUNCHERS + [RAYCLUSTER, RAYJOB]) <= set(files)
    for path in files:
        _documents(path)


# -- Ray cluster launcher -----------------------------------------------------------------------

@pytest.fixture(params=LAUNCHERS, ids=lambda p: p.name)
def launcher(request) -> tuple[Path, dict]:
    return request.param, _documents(request.param)[0]


def test_launcher_structure(launcher):
    path, cfg = launcher
    for key in ("cluster_name", "max_workers", "provider", "auth", "docker",
                "available_node_types", "head_node_type", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"{path}: missing top-level key {key!r}"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types, f"{path}: head_node_type is not a node type"

    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, f"{path}: the head must not advertise GPUs"
    assert "guestAccelerators" not in head["node_config"]
    assert not GPU_INSTANCE.match(head["node_config"].get("InstanceType", "")), path

    def is_gpu(node_type: dict) -> bool:
        node_config = node_type["node_config"]
        return (node_type["resources"].get("GPU", 0) > 0 or "guestAccelerators" in node_config
                or bool(GPU_INSTANCE.match(node_config.get("InstanceType", ""))))

    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and is_gpu(t)]
    assert gpu, f"{path}: no GPU worker type"
    for node_type in gpu:
        assert node_type.get("min_workers", 0) == 0, f"{path}: GPU workers should scale from 0"
        assert node_type["max_workers"] > 0
        assert cfg["max_workers"] >= 1
        node_config = node_type["node_config"]
        if cfg["provider"]["type"] == "gcp":
            assert node_config["guestAccelerators"][0]["acceleratorCount"] >= 1
            assert {"onHostMaintenance": "TERMINATE"} in node_config["scheduling"]
            scopes = node_config["serviceAccounts"][0]["scopes"]
            assert any("devstorage" in s or "cloud-platform" in s for s in scopes)
        else:  # aws: workers get no instance profile from Ray, so S3 needs one here
            assert node_config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_launcher_image_matches_installed_ray(launcher):
    path, cfg = launcher
    docker = cfg["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in cfg["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    assert images, f"{path}: no docker image"
    for image in images:
        _check_image(image, str(path))


def test_launcher_installs_this_package(launcher):
    path, cfg = launcher
    source = cfg["file_mounts"].get(PACKAGE_MOUNT)
    assert source is not None, f"{path}: the repository is not mounted at {PACKAGE_MOUNT}"
    assert (REPO / source).resolve() == REPO, f"{path}: {source!r} is not the repo root"
    commands = cfg["setup_commands"] + cfg.get("head_setup_commands", []) + cfg.get(
        "worker_setup_commands", [])
    assert any("pip install" in c and PACKAGE_MOUNT in c for c in commands), (
        f"{path}: no setup command installs {PACKAGE_MOUNT}")
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def _ray_schema() -> dict:
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"this Ray ships no {schema_path.name}")
    return json.loads(schema_path.read_text())


def test_launcher_validates_against_ray_schema(launcher):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    path, cfg = launcher
    jsonschema.validate(cfg, _ray_schema())
    # What `ray up` does before launching anything: defaults merged, then validated.
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_ray_schema_rejects_a_misspelled_key(launcher):
    """The schema check above can fail: a typo in a node type is an error."""
    jsonschema = pytest.importorskip("jsonschema")

    path, cfg = launcher
    broken = copy.deepcopy(cfg)
    head = broken["available_node_types"][broken["head_node_type"]]
    head["min_worker"] = head.pop("min_workers", 0)
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, _ray_schema())


# -- KubeRay ------------------------------------------------------------------------------------

def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(k, {}).get("nvidia.com/gpu", 0)) for k in ("limits", "requests"))


def _check_ray_cluster_spec(spec: dict, path: Path, service_accounts: set[str]) -> None:
    assert spec["rayVersion"] == ray.__version__, f"{path}: rayVersion != {ray.__version__}"
    assert spec.get("enableInTreeAutoscaling") is True, f"{path}: autoscaling is off"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    for container in _containers(head):
        assert _gpus(container) == 0, f"{path}: the head requests a GPU"
        _check_image(container["image"], f"{path} head")
    groups = spec["workerGroupSpecs"]
    for group in groups:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= group.keys()
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        for container in _containers(group):
            _check_image(container["image"], f"{path} {group['groupName']}")
        for pod in (head, group):
            account = pod["template"]["spec"].get("serviceAccountName")
            assert account is None or account in service_accounts, (
                f"{path}: serviceAccountName {account!r} is not defined in the file")
    gpu_groups = [g for g in groups if any(_gpus(c) >= 1 for c in _containers(g))]
    assert gpu_groups, f"{path}: no worker group requests nvidia.com/gpu"
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in gpu_groups)


def _service_accounts(path: Path) -> set[str]:
    return {d["metadata"]["name"] for d in _documents(path) if d.get("kind") == "ServiceAccount"}


def test_raycluster():
    cluster = _kind(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"], RAYCLUSTER, _service_accounts(RAYCLUSTER))


def test_rayjob():
    job = _kind(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"], RAYJOB, _service_accounts(RAYJOB))
    # the one-run cluster is the long-lived one, so a fix to one reaches the other
    assert spec["rayClusterSpec"] == _kind(RAYCLUSTER, "RayCluster")["spec"]

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"] and "--config" in argv
    _check_module(argv[2], str(RAYJOB))
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"{RAYJOB}: {config} does not exist"
    _check_job_config(REPO / config)

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    # Ray's images have no torch: the job must bring exactly the package's dependencies.
    assert runtime_env["pip"]["packages"] == _pyproject_dependencies()


# -- entry points and configs named in the docs ---------------------------------------------------

def _check_module(module: str, where: str) -> None:
    base = REPO.joinpath(*module.split("."))
    assert base.with_suffix(".py").is_file() or (base / "__main__.py").is_file(), (
        f"{where}: `python -m {module}` names no module of this repository")


def _doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(p for p in CLUSTER.rglob("*") if p.is_file()),
            *JOB_CONFIGS]


def test_documented_entry_points_exist():
    seen = set()
    for path in _doc_files():
        for module in re.findall(r"python -m ((?:jobs|diffinf_ray)(?:\.\w+)+)", path.read_text()):
            _check_module(module, str(path))
            seen.add(module)
    assert "jobs.pipeline" in seen and "diffinf_ray.diffae.official" in seen


def test_documented_configs_exist_and_validate():
    seen = set()
    for path in _doc_files():
        for config in re.findall(r"jobs/configs/[\w.-]+\.yaml", path.read_text()):
            assert (REPO / config).is_file(), f"{path}: {config} does not exist"
            seen.add(config)
    for config in seen:
        _check_job_config(REPO / config)
    assert {"jobs/configs/ffhq_age.yaml", "jobs/configs/ffhq_expression.yaml"} <= seen


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_job_config_validates(path):
    _check_job_config(path)


@pytest.mark.parametrize("path", FFHQ_CONFIGS, ids=lambda p: p.name)
def test_ffhq_config(path):
    cfg = load_config(path)
    age = cfg.data.task == "age"
    assert cfg.run.root.startswith("s3://") and cfg.data.path.startswith("s3://")
    assert cfg.data.source == "table" and cfg.data.path.endswith((".parquet", ".csv"))
    assert cfg.data.image_size == 128
    assert cfg.class_names == (["young", "middle", "old"] if age
                               else ["happy", "neutral", "surprised", "sad"])
    assert cfg.noise.kind == "symmetric" and cfg.noise.rate == (0.3 if age else 0.2)
    assert cfg.train.use_gpu and cfg.train.num_workers > 1
    assert cfg.train.epochs == 100 and cfg.train.lr == 1e-4 and cfg.train.checkpoint_every == 10
    assert cfg.influence.use_gpu and cfg.influence.actors > 1 and cfg.influence.tau == 0.1
    ae = cfg.autoencoder
    assert ae.weights_format == "official" and ae.weights_uri.endswith(".safetensors")
    assert ae.weights_sha256 and ae.use_gpu
    lossnets = cfg.lossnets
    assert lossnets.identity_onnx_uri.endswith("w600k_r50.onnx")
    assert lossnets.parsing_uri.endswith("79999_iter.pth")
    assert lossnets.lpips_net == "alex" and lossnets.lpips_backbone_uri
    assert cfg.edit.use_gpu and cfg.edit.actors > 1 and cfg.edit.gpus_per_actor == 0.5
    assert cfg.baselines.options["small_loss"]["noise_rate"] == cfg.noise.rate
    # every stage but the synthfaces-only judges, the oracle relabel (a control that needs
    # the truth of every label) and the opt-in ekfac detector
    assert cfg.stages == [s for s in STAGES if s not in ("judges", "oracle", "relabel", "ekfac")]


def test_ffhq_configs_differ_only_in_task():
    age, expression = (load_config(p).model_dump() for p in FFHQ_CONFIGS)
    differ = {section for section in age if age[section] != expression[section]}
    assert differ == {"run", "data", "noise", "baselines"}


def test_placeholder_sha256_stops_with_a_clear_error(tmp_path):
    """Until the user fills in a hash, loading fails naming the file and the expected value."""
    from diffinf_ray.diffae.weights import WeightsError as DiffAEWeightsError
    from diffinf_ray.diffae.weights import check_sha256
    from diffinf_ray.models.weights import WeightsError, read_verified_bytes

    cfg = load_config(FFHQ_CONFIGS[0])
    weights = tmp_path / "79999_iter.pth"
    weights.write_bytes(b"not the real file")
    with pytest.raises(WeightsError) as err:
        read_verified_bytes(str(weights), cfg.lossnets.parsing_sha256)
    assert str(weights) in str(err.value) and cfg.lossnets.parsing_sha256 in str(err.value)
    with pytest.raises(DiffAEWeightsError, match=cfg.autoencoder.weights_sha256):
        check_sha256(b"export", cfg.autoencoder.weights_sha256, "ffhq128_autoenc_ema.safetensors")
