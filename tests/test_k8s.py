"""k8s/: every manifest is one the API server and the Kubeflow operator accept, with no silently dropped field,
and the commands in it name files, configs and config keys that exist.

- PyTorchJob: the CRD's openAPIV3Schema (../shared/schemas) made strict (`additionalProperties: false` where the
  CRD leaves an object with declared properties open, as the API server's pruning would silently drop unknown
  fields), plus the operator webhook's rules (only Master/Worker, exactly one Master, a `pytorch` container with
  an image, DNS-1035 name).
- Core kinds: kubernetes-validate, strict, against recent Kubernetes versions.
- `kubectl kustomize k8s` renders (when kubectl is installed) and the rendered objects pass the same checks.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "k8s"
SCHEMAS = REPO_ROOT.parent / "shared" / "schemas"
CRD_FILE = SCHEMAS / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSIONS = ["1.30", "1.34"]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _manifest_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


DOCS = _manifest_docs()
JOBS = {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == "PyTorchJob"}
CORE_JOBS = {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == "Job"}


def _by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


# --------------------------------------------------------------------------------------------- validators


def _strict(schema):
    """Copy of an OpenAPI schema where objects with declared properties reject undeclared ones."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator():
    jsonschema = pytest.importorskip("jsonschema")
    if not CRD_FILE.is_file():
        pytest.skip(f"PyTorchJob CRD schema not found at {CRD_FILE} (it sits beside the repo in CI only)")
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    return {"plain": jsonschema.Draft7Validator(schema), "strict": jsonschema.Draft7Validator(_strict(schema))}


def _schema_errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def webhook_errors(job: dict) -> list[str]:
    """The PyTorchJob validating webhook's rules (training-operator v1.9, pytorchjob_webhook.go)."""
    errors = []
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 63 or not DNS_1035.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    specs = job.get("spec", {}).get("pytorchReplicaSpecs") or {}
    for replica_type, spec in specs.items():
        if replica_type not in ("Master", "Worker"):
            errors.append(f"replica type {replica_type!r} is not Master or Worker")
        containers = (spec.get("template", {}).get("spec", {}) or {}).get("containers") or []
        pytorch = [c for c in containers if c.get("name") == "pytorch"]
        if not pytorch:
            errors.append(f"{replica_type}: no container named 'pytorch'")
        elif not pytorch[0].get("image"):
            errors.append(f"{replica_type}: the 'pytorch' container has no image")
    if "Master" not in specs:
        errors.append("no Master replica")
    elif specs["Master"].get("replicas", 1) != 1:
        errors.append(f"Master replicas must be 1, got {specs['Master'].get('replicas')}")
    return errors


def job_api_errors(job: dict) -> list[str]:
    """The API server's Job rules that the OpenAPI schema does not express (kubernetes pkg/apis/batch/validation,
    v1.30-1.34): Indexed needs completions; per-index backoff only on Indexed Jobs; FailIndex needs per-index backoff;
    a pod failure policy needs restartPolicy Never and names real containers, never exit code 0 with In."""
    errors = []
    spec = job.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    indexed = spec.get("completionMode") == "Indexed"
    if indexed and spec.get("completions") is None:
        errors.append("completionMode Indexed needs spec.completions")
    for field in ("backoffLimitPerIndex", "maxFailedIndexes"):
        if field in spec and not indexed:
            errors.append(f"spec.{field} needs completionMode Indexed")
    if "maxFailedIndexes" in spec and "backoffLimitPerIndex" not in spec:
        errors.append("spec.maxFailedIndexes needs spec.backoffLimitPerIndex")
    policy = spec.get("podFailurePolicy")
    if policy is not None:
        if pod.get("restartPolicy") != "Never":
            errors.append("podFailurePolicy needs template restartPolicy Never")
        names = {c["name"] for c in pod.get("containers", []) + pod.get("initContainers", [])}
        for rule in policy.get("rules", []):
            if rule["action"] == "FailIndex" and "backoffLimitPerIndex" not in spec:
                errors.append("action FailIndex needs spec.backoffLimitPerIndex")
            codes = rule.get("onExitCodes")
            if codes:
                if codes.get("containerName") is not None and codes["containerName"] not in names:
                    errors.append(f"onExitCodes.containerName {codes['containerName']!r} names no container")
                if codes["operator"] == "In" and 0 in codes["values"]:
                    errors.append("onExitCodes with operator In cannot list 0")
    return errors


def _check_core(doc: dict) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


# ------------------------------------------------------------------------------------------------ schema


def test_manifests_hold_the_expected_objects():
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS)
    assert kinds == [
        ("Deployment", "ctld-tensorboard"), ("Job", "ctld-shards-build"), ("Job", "ctld-shards-encode"),
        ("Job", "ctld-shards-merge"), ("PersistentVolumeClaim", "ctld-data"),
        ("Pod", "ctld-data"), ("PyTorchJob", "ctld-diffusion"), ("PyTorchJob", "ctld-vae"),
        ("Service", "ctld-tensorboard"),
    ]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_pytorchjob_matches_crd_schema_and_webhook(name, crd_validator):
    job = JOBS[name]
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert _schema_errors(crd_validator["strict"], job) == []
    assert webhook_errors(job) == []


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec",), "pytorchReplicaSpec"),  # spec.pytorchReplicaSpecs misspelt: the job would have no replicas
        (("spec", "pytorchReplicaSpecs", "Worker"), "replica"),  # replicas misspelt: would default to 1
        (("spec", "pytorchReplicaSpecs", "Master", "template", "spec"), "terminationGracePeriodSecond"),
        (("spec", "pytorchReplicaSpecs", "Master", "template", "spec", "containers", 0), "volumeMount"),
    ],
)
def test_strict_schema_rejects_planted_typos(path, typo, crd_validator):
    job = copy.deepcopy(JOBS["ctld-vae"])
    node = job
    for key in path:
        node = node[key]
    node[typo] = node.get(typo[:-1] if typo.endswith("s") else typo + "s", 1)
    errors = _schema_errors(crd_validator["strict"], job)
    assert any(typo in error for error in errors), errors
    if path != ("spec",):
        # The CRD as published accepts these; the API server would prune the field without a word.
        assert _schema_errors(crd_validator["plain"], job) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda j: j["spec"]["pytorchReplicaSpecs"].__setitem__("Chief", j["spec"]["pytorchReplicaSpecs"]["Worker"]),
         "'Chief' is not Master or Worker"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replicas", 2), "Master replicas must be 1"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].pop("Master"), "no Master replica"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
         .__setitem__("name", "trainer"), "Worker: no container named 'pytorch'"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("image"),
         "Master: the 'pytorch' container has no image"),
        (lambda j: j["metadata"].__setitem__("name", "ctld_vae"), "is not a DNS-1035 label"),
        (lambda j: j["metadata"].__setitem__("name", "1vae"), "is not a DNS-1035 label"),
    ],
)
def test_webhook_rules_reject_bad_jobs(mutate, message):
    job = copy.deepcopy(JOBS["ctld-vae"])
    mutate(job)
    assert any(message in error for error in webhook_errors(job)), webhook_errors(job)


@pytest.mark.parametrize(("file", "index"), [(f, i) for i, (f, d) in enumerate(DOCS) if d["kind"] != "PyTorchJob"])
def test_core_objects_validate_strictly(file, index):
    pytest.importorskip("kubernetes_validate")
    _check_core(DOCS[index][1])


def test_core_validation_rejects_a_planted_typo():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = CORE_JOBS["ctld-shards-build"]
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        _check_core(bad)


def test_kustomize_renders_with_edited_image_and_node_counts(tmp_path, crd_validator):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (`kubectl kustomize` renders k8s/ offline when installed)")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    expected_image = f"{image['newName']}:{image['newTag']}"
    images = [c["image"] for d in docs for c in _containers(d)]
    assert images and set(images) == {expected_image}, "every container runs the image set in kustomization.yaml"
    workers = {p["target"]["name"]: yaml.safe_load(p["patch"])[0]["value"] for p in kustomization["patches"]}
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            assert doc["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == workers[doc["metadata"]["name"]]
            assert _schema_errors(crd_validator["strict"], doc) == [] and webhook_errors(doc) == []
        else:
            pytest.importorskip("kubernetes_validate")
            _check_core(doc)
    assert len(docs) == len(DOCS)


# -------------------------------------------------------------------------- what the manifests run


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    if doc["kind"] == "PyTorchJob":
        return [(t, s["template"]["spec"]) for t, s in doc["spec"]["pytorchReplicaSpecs"].items()]
    if doc["kind"] == "Pod":
        return [("Pod", doc["spec"])]
    if doc["kind"] in ("Job", "Deployment"):
        return [(doc["kind"], doc["spec"]["template"]["spec"])]
    return []


def _containers(doc: dict) -> list[dict]:
    return [c for _, spec in _pod_specs(doc) for c in spec.get("initContainers", []) + spec["containers"]]


def _flag(args: list[str], key: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{key}=")]
    assert len(values) == 1, f"--{key}= given {len(values)} times in {args}"
    return values[0]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_training_command_names_real_files_configs_and_keys(name):
    from ctld.config import load_config

    stage = name.removeprefix("ctld-")
    for replica_type, spec in _pod_specs(JOBS[name]):
        (container,) = [c for c in spec["containers"] if c["name"] == "pytorch"]
        assert container["workingDir"] == "/opt/ctld", "the Dockerfile copies the repository to /opt/ctld"
        command = container["command"]
        assert command[:2] == ["bash", "launch/multinode.sh"]
        launch_config, script, config, *overrides = command[2:]
        assert (REPO_ROOT / launch_config).is_file() and launch_config.startswith("launch/")
        raw = yaml.safe_load((REPO_ROOT / launch_config).read_text())
        assert raw["distributed_type"] in ("MULTI_GPU", "DEEPSPEED") and not raw.get("use_cpu"), launch_config
        assert script == "ctld/train.py" and (REPO_ROOT / script).is_file()
        assert config.startswith("configs/") and (REPO_ROOT / config).is_file()
        cfg = load_config(REPO_ROOT / config, overrides)  # unknown keys or bad values raise here
        assert cfg.train.stage == stage and cfg.train.resume == "latest"
        assert cfg.train.output_dir.startswith("/data/") and cfg.data.shards_dir.startswith("/data/")
        if stage == "diffusion":
            vae_args = JOBS["ctld-vae"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
            vae_cfg = load_config(REPO_ROOT / config, vae_args["command"][5:])
            assert cfg.train.vae_export == f"{vae_cfg.train.output_dir}/{vae_cfg.train.run_name}/export"
        assert replica_type in ("Master", "Worker")


@pytest.mark.parametrize("name", sorted(JOBS))
def test_training_pods_have_gpus_shm_volume_and_preemption_settings(name):
    job = JOBS[name]
    claims = {doc["metadata"]["name"] for doc in _by_kind("PersistentVolumeClaim")}
    for replica_type, replica in job["spec"]["pytorchReplicaSpecs"].items():
        spec = replica["template"]["spec"]
        # Issue 15: OnFailure restarted deterministic failures backoffLimit times; ExitCode restarts only 128-255
        # (launch/multinode.sh exits 143 when preempted) and ends the job on 1-127.
        assert replica["restartPolicy"] == "ExitCode"
        (container,) = spec["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] in claims
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= env.keys()
        # The launcher must not SIGKILL the ranks before their SIGTERM checkpoint, nor the kubelet the launcher.
        assert 0 < int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < spec["terminationGracePeriodSeconds"]
        assert spec["terminationGracePeriodSeconds"] >= 300
        assert spec["securityContext"]["runAsNonRoot"] is True
        if replica_type == "Worker":
            (init,) = spec["initContainers"]
            assert f"getent hosts {name}-master-0" in " ".join(init["command"]), "wait for the Master's DNS"
        else:
            assert "initContainers" not in spec, "the Master's own headless Service only resolves once it is ready"


def test_shards_job_and_tensorboard_use_the_training_paths():
    job = CORE_JOBS["ctld-shards-build"]
    (build,) = job["spec"]["template"]["spec"]["containers"]
    command = build["command"]
    assert command[:2] == ["ctld-shards", "build"]
    assert "ctld-shards = ctld.data.build_shards:main" in (REPO_ROOT / "setup.py").read_text()
    out = command[command.index("--out") + 1]
    config = command[command.index("--config") + 1]
    assert (REPO_ROOT / config).is_file()
    master = JOBS["ctld-vae"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert _flag(master["command"], "data.shards_dir") == out
    (tensorboard,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "ctld-tensorboard"]
    tb_command = tensorboard["spec"]["template"]["spec"]["containers"][0]["command"]
    assert tb_command[tb_command.index("--logdir") + 1] == _flag(master["command"], "train.output_dir")
    (service,) = _by_kind("Service")
    assert service["spec"]["selector"] == tensorboard["spec"]["selector"]["matchLabels"]
    assert all(doc["metadata"]["labels"]["app.kubernetes.io/component"] for _, doc in DOCS), "README applies by label"


# -------------------------------------------------------------------- archive scale: partitions and encode (issue 25)


@pytest.mark.parametrize("name", sorted(CORE_JOBS))
def test_jobs_follow_the_api_servers_job_rules(name):
    assert job_api_errors(CORE_JOBS[name]) == []


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda j: j["spec"].pop("completionMode"), "spec.backoffLimitPerIndex needs completionMode Indexed"),
    (lambda j: j["spec"].pop("backoffLimitPerIndex"), "action FailIndex needs spec.backoffLimitPerIndex"),
    (lambda j: j["spec"]["template"]["spec"].__setitem__("restartPolicy", "OnFailure"),
     "podFailurePolicy needs template restartPolicy Never"),
    (lambda j: j["spec"]["template"]["spec"]["containers"][0].__setitem__("name", "builder"),
     "onExitCodes.containerName 'build' names no container"),
    (lambda j: j["spec"].pop("completions"), "completionMode Indexed needs spec.completions"),
])
def test_job_rules_reject_bad_jobs(mutate, message):
    job = copy.deepcopy(CORE_JOBS["ctld-shards-build"])
    mutate(job)
    assert message in job_api_errors(job)


def _parsed(command: list[str]):
    """argparse's view of a `ctld-shards` command line (unknown flags left over: --section.key=value)."""
    from ctld.data.build_shards import _parser

    args, extra = _parser().parse_known_args(command)
    return args, extra


def test_partitioned_build_then_merge_then_encode_share_one_folder():
    from ctld.config import load_config
    from ctld.data.shard_plan import parse_partition

    build, merge, encode = (CORE_JOBS[n] for n in ("ctld-shards-build", "ctld-shards-merge", "ctld-shards-encode"))
    spec = build["spec"]
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= spec["completions"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"][:2] == ["ctld-shards", "build"]
    args, extra = _parsed(container["command"][1:])
    # --partition N: the index comes from JOB_COMPLETION_INDEX, which the Job sets from 0 to completions - 1.
    assert [parse_partition(args.partition, {"JOB_COMPLETION_INDEX": str(i)}) for i in (0, spec["completions"] - 1)
            ] == [(0, spec["completions"]), (spec["completions"] - 1, spec["completions"])]
    load_config(REPO_ROOT / args.config, extra)  # unknown keys or bad values raise here
    # Preemption never fails the job; deterministic failures (exit 1, 2) fail only their index.
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    (exit_rule,) = [r for r in rules if "onExitCodes" in r]
    assert exit_rule["action"] == "FailIndex" and exit_rule["onExitCodes"]["values"] == [1, 2]
    assert spec["backoffLimitPerIndex"] >= 1 and "maxFailedIndexes" not in spec, "other partitions still finish"

    (merge_container,) = merge["spec"]["template"]["spec"]["containers"]
    merge_args, merge_extra = _parsed(merge_container["command"][1:])
    assert merge_args.command == "merge" and merge_args.out == args.out and not merge_extra
    labels = {job["metadata"]["labels"]["app.kubernetes.io/component"] for job in (build, merge, encode)}
    assert labels == {"shards", "shards-merge", "encode"}, "the merge is applied after the build completes"

    encode_spec = encode["spec"]
    (encode_container,) = encode_spec["template"]["spec"]["containers"]
    command = encode_container["command"]
    assert command[:2] == ["accelerate", "launch"] and "--multi_gpu" in command
    module = command.index("-m")
    assert command[module + 1] == "ctld.data.build_shards"
    processes = int(command[command.index("--num_processes") + 1])
    assert processes == encode_container["resources"]["limits"]["nvidia.com/gpu"]
    encode_args, encode_extra = _parsed(command[module + 2:])
    assert encode_args.command == "encode" and encode_args.shards == args.out
    assert parse_partition(encode_args.partition, {"JOB_COMPLETION_INDEX": "0"}) == (0, encode_spec["completions"])
    load_config(REPO_ROOT / encode_args.config, encode_extra)
    vae = JOBS["ctld-vae"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    vae_cfg = load_config(REPO_ROOT / vae[4], vae[5:])
    assert encode_args.vae == f"{vae_cfg.train.output_dir}/{vae_cfg.train.run_name}/export"
    assert encode_args.out.startswith("/data/") and encode_args.out != args.out
