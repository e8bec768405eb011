"""infra/: the Kubernetes manifests, the IAM policy and the Prometheus alerts, checked offline.

The alert rules go through Prometheus's own checker and unit tests (promtool, from Debian's
prometheus package). Every manifest is validated against its schema: RayCluster and RayJob against
upstream KubeRay's CRDs (v1.7.0, vendored under tests/schemas/), the core objects with
kubernetes-validate (Kubernetes 1.31, strict). Beyond schemas, the manifests are checked for what
would break a deployment of this project: every job command parses with the job's real argument
parser, the config it names exists and loads, the operator's rules the RayJob relies on, names and
namespaces agree across files, and the IAM policy grants the lake operations the code performs and
nothing wider.
"""

import importlib.util
import json
import shlex
import subprocess

import pytest
import yaml

from conftest import ROOT, system_binary

INFRA = ROOT / "infra"


def job_parser(name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_manifests():
    return [(p.name, d) for p in sorted((INFRA / "kuberay").glob("*.yaml")) for d in docs(p)]


def promtool():
    return system_binary("promtool", "prometheus")


def test_alert_rules_pass_promtool_check_and_unit_tests():
    rules = INFRA / "prometheus"
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]):
        done = subprocess.run([promtool(), *args], cwd=rules, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_watch_series_the_export_pushes():
    from macrid.training import telemetry

    pushed = set()
    source = (ROOT / "macrid" / "training" / "telemetry.py").read_text()
    for line in source.splitlines():
        if 'gauge("macrid_export_' in line:
            pushed.add(line.split('gauge("')[1].split('"')[0])
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yaml").read_text())["groups"][0]["rules"]
    used = {w.split("{")[0] for r in rules for w in r["expr"].replace("(", " ").split() if w.startswith("macrid_")}
    assert used and used <= pushed, used - pushed
    assert telemetry.EXPORT_JOB == "macrid_export"


def test_nightly_alerts_watch_series_a_real_push_of_a_refused_night(pushgateway):
    """push_nightly's series, read back from a real Pushgateway: a refused night, then a good one (pushadd keeps the
    failure time); every series the nightly alert rules use is among them."""
    import urllib.request

    from macrid.nightly import Night
    from macrid.training.telemetry import NIGHTLY_JOB, push_nightly

    def pushed_lines():
        text = urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5).read().decode()
        return [line for line in text.splitlines()
                if line.startswith("macrid_nightly_") and f'job="{NIGHTLY_JOB}"' in line]

    push_nightly(pushgateway, "prod", Night(run="prod-x", stopped_at="promote", refused=True,
                                            seconds={"prepare": 1.0, "train": 2.0, "promote": 0.5},
                                            decision={"promoted": False, "z": -3.5}))
    lines = pushed_lines()
    assert any(line.startswith("macrid_nightly_gate_promoted{") and line.endswith(" 0") for line in lines), lines
    assert any('stage="promote"' in line and line.startswith("macrid_nightly_stage_ok{") and line.endswith(" 0")
               for line in lines), lines
    assert any(line.startswith("macrid_nightly_gate_z{") and line.endswith(" -3.5") for line in lines), lines
    push_nightly(pushgateway, "prod", Night(run="prod-y", seconds={"prepare": 1.0, "train": 2.0, "promote": 0.5,
                                                                   "export": 1.0}, decision={"promoted": True, "z": 0.4}))
    pushed = {line.split("{")[0] for line in pushed_lines()}
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yaml").read_text())["groups"][1]["rules"]
    used = {w.split("{")[0] for r in rules for w in r["expr"].replace("(", " ").split() if w.startswith("macrid_")}
    assert used and used <= pushed, used - pushed


def test_every_manifest_is_a_named_object_in_the_macrid_namespace():
    manifests = all_manifests()
    kinds = {d["kind"] for _, d in manifests}
    assert {"RayCluster", "RayJob", "CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= kinds
    for name, d in manifests:
        assert d["apiVersion"] and d["metadata"]["name"], name
        assert d["metadata"]["namespace"] == "macrid", name


def rayjobs():
    jobs = [d for _, d in all_manifests() if d["kind"] == "RayJob"]
    for _, d in all_manifests():
        if d["kind"] == "ConfigMap":
            jobs += [yaml.safe_load(v) for v in d["data"].values()]
    return jobs


def test_job_commands_parse_with_the_jobs_own_arguments():
    from macrid.config import load_config

    seen = set()
    for job in rayjobs():
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
        name = argv[1].removeprefix("jobs/").removesuffix(".py")
        args = job_parser(name).parse_args(argv[2:])  # exits (fails the test) on an unknown or bad flag
        seen.add(name)
        if name == "train":
            assert (ROOT / args.config).exists()
            load_config(str(ROOT / args.config), args.set)
        # every job on the cluster reads an S3 lake (a local path does not reach the pods)
        assert args.lake.startswith("s3://")
        spec = job["spec"]
        assert spec.get("clusterSelector", {}).get("ray.io/cluster") == "macrid" or "rayClusterSpec" in spec
    assert seen == {"train", "export", "nightly"}


def test_a_retried_training_job_continues_its_run():
    """A RayJob that retries (backoffLimit > 0) reruns its entrypoint on a new cluster: the retry continues the
    run only with a fixed run name and --resume (tests/test_multinode.py runs exactly that after a cluster
    loss), and only a RayJob that owns its cluster (rayClusterSpec) gets a new one to retry on."""
    retried = [job for job in rayjobs() if job["spec"].get("backoffLimit", 0) > 0]
    assert any(job["spec"]["entrypoint"].split()[1] == "jobs/train.py" for job in retried)
    for job in retried:
        argv = shlex.split(job["spec"]["entrypoint"])
        if argv[1] != "jobs/train.py":
            continue
        args = job_parser("train").parse_args(argv[2:])
        names = [kv.split("=", 1)[1] for kv in args.set if kv.startswith("run.name=")]
        assert names and names[-1].strip("'\"") and args.resume, job["metadata"]["name"]
        assert "rayClusterSpec" in job["spec"] and "clusterSelector" not in job["spec"], job["metadata"]["name"]
        assert args.lake.startswith("s3://")


@pytest.mark.parametrize("name", ["macrid-nightly-export", "macrid-nightly-loop"])
def test_cronjob_submits_its_template_and_may_create_rayjobs_only(name):
    manifests = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in all_manifests())
    cron = manifests[("CronJob", name)]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # one writer per table
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volume = pod["volumes"][0]["configMap"]["name"]
    assert ("ConfigMap", volume) in manifests
    script = pod["containers"][0]["args"][0]
    assert "/templates/rayjob.yaml" in script and "SUCCEEDED" in script
    role = manifests[("Role", pod["serviceAccountName"])]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "watch", "delete"]}]
    binding = manifests[("RoleBinding", pod["serviceAccountName"])]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


def test_gpu_pods_match_the_workers_default_size():
    from macrid.config import RunConfig

    cluster = next(d for _, d in all_manifests() if d["kind"] == "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(worker["nvidia.com/gpu"]) >= RunConfig().gpus_per_worker
    assert int(worker["cpu"]) >= 2  # one CPU for the trainer, the rest for Ray Data


def test_iam_policy_grants_the_lake_operations_and_nothing_wider():
    policy = json.loads((INFRA / "iam" / "lake-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    # what the code does on S3: list (listing shards, Delta logs), read, write, delete (staging, overwrite)
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    assert not any("*" in a for a in actions)
    for s in policy["Statement"]:
        assert s["Effect"] == "Allow"
        resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        assert all(r.startswith("arn:aws:s3:::<bucket>") for r in resources)
        if "s3:PutObject" in s["Action"] or "s3:DeleteObject" in s["Action"]:
            assert resources == ["arn:aws:s3:::<bucket>/macrid/*"]  # writes only under the lake


def test_the_rayjob_template_keeps_the_operators_rules():
    """KubeRay (>= 1.4) refuses ttlSecondsAfterFinished unless shutdownAfterJobFinishes is true, and a RayJob
    on an existing cluster (clusterSelector) cannot shut it down nor bring its own: no RayJob sets either."""
    import yaml

    manifests = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in all_manifests())
    template = yaml.safe_load(manifests[("ConfigMap", "macrid-export-rayjob")]["data"]["rayjob.yaml"])
    assert template in rayjobs() and len(rayjobs()) >= 4  # the templates, the training job, the spot training job
    for job in rayjobs():
        spec = job["spec"]
        if "ttlSecondsAfterFinished" in spec:
            assert spec.get("shutdownAfterJobFinishes") is True, job["metadata"]["name"]
        if spec.get("clusterSelector"):
            assert not spec.get("shutdownAfterJobFinishes") and "rayClusterSpec" not in spec, job["metadata"]["name"]


@pytest.mark.parametrize("phase,status,rc", [("Complete", "SUCCEEDED", 0), ("Complete", "FAILED", 1),
                                            ("Failed", "FAILED", 1), ("ValidationFailed", "", 1)])
@pytest.mark.parametrize("cron,prefix", [("macrid-nightly-export", "export"), ("macrid-nightly-loop", "nightly")])
def test_the_submit_script_stops_waiting_on_every_end_state(tmp_path, phase, status, rc, cron, prefix):
    """Each CronJob's script with a kubectl on PATH that answers with a fixed RayJob state: it ends at once
    with the right exit status instead of waiting out its deadline."""
    import subprocess

    manifests = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in all_manifests())
    pod = manifests[("CronJob", cron)]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    template = manifests[("ConfigMap", pod["volumes"][0]["configMap"]["name"])]["data"]["rayjob.yaml"]
    assert f"name: macrid-{prefix}-DATE" in template
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "rayjob.yaml").write_text(template)
    script = script.replace("/templates/", f"{tmp_path}/templates/")
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"$@\" >> \"$KUBECTL_LOG\"\n"
                    "case \"$*\" in *jobDeploymentStatus*) printf %s \"$PHASE\";; *jobStatus*) printf %s \"$STATUS\";;"
                    " *apply*) cat > /dev/null;; esac\n")
    fake.chmod(0o755)
    log = tmp_path / "kubectl.log"
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "PHASE": phase, "STATUS": status, "KUBECTL_LOG": str(log),
           "EXPORT_DATE": "2026-11-28", "WAIT_SECONDS": "20", "POLL_SECONDS": "1"}
    done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == rc, done.stdout + done.stderr
    calls = log.read_text()
    assert f"delete rayjob/macrid-{prefix}-2026-11-20 --ignore-not-found" in calls
    assert f"{prefix} 2026-11-28: {phase}" in done.stdout


# --- schemas: upstream KubeRay's CRDs (vendored) and Kubernetes' own (kubernetes-validate, from PyPI) ---
# tests/schemas/kuberay-v1.7.0-*.json.gz: the v1 openAPIV3Schema (status removed) of
# ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml at KubeRay tag v1.7.0,
# commit 59d663aeec13760646da3db9c1cf8cfe883e30b7 (github.com/ray-project/kuberay).
KUBERAY_SCHEMAS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
KUBERNETES_VERSION = "1.31.0"  # the oldest cluster the README supports


def strict(schema):
    """The CRD schema with unknown fields refused, as kubectl's default field validation (Strict) does: every
    object with declared properties and no x-kubernetes-preserve-unknown-fields gets additionalProperties false."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def crd_validator(kind):
    import gzip

    import jsonschema

    doc = json.loads(gzip.decompress((ROOT / "tests" / "schemas" / f"kuberay-v1.7.0-{KUBERAY_SCHEMAS[kind]}.json.gz")
                                     .read_bytes()))
    assert doc["kind"] == kind and doc["group"] == "ray.io"
    schema = strict(doc["schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by Kubernetes, not the CRD
    return jsonschema.Draft7Validator(schema)


def every_object():
    """Every manifest, and the RayJob the CronJob applies (its ConfigMap's template, DATE filled in)."""
    objs = [(name, d) for name, d in all_manifests()]
    for name, d in all_manifests():
        if d["kind"] == "ConfigMap":
            objs += [(f"{name}:{key}", yaml.safe_load(v.replace("DATE", "2026-12-01"))) for key, v in d["data"].items()]
    return objs


def schema_errors(obj):
    if obj["kind"] in KUBERAY_SCHEMAS:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def test_every_manifest_passes_its_schema():
    objs = every_object()
    assert {d["kind"] for _, d in objs} >= {"RayCluster", "RayJob", "CronJob", "ConfigMap", "Role", "ServiceAccount"}
    assert sum(d["kind"] == "RayJob" for _, d in objs) >= 2  # the training job and the export template
    for name, obj in objs:
        assert schema_errors(obj) == [], name


@pytest.mark.parametrize("kind,where,bad,words", [
    ("RayJob", ("spec",), {"shutdownAfterJobFinish": True}, "shutdownAfterJobFinish"),  # a misspelt field
    ("RayJob", ("spec",), {"backoffLimit": "one"}, "'one' is not of type 'integer'"),
    ("RayCluster", ("spec",), {"rayVersion": 2.6}, "is not of type 'string'"),
    ("CronJob", ("spec",), {"schedule": 230}, "230"),
    ("CronJob", ("spec", "jobTemplate", "spec"), {"backofLimit": 1}, "backofLimit"),
])
def test_the_schema_check_sees_a_planted_mistake(kind, where, bad, words):
    import copy

    obj = copy.deepcopy(next(d for _, d in every_object() if d["kind"] == kind))
    node = obj
    for key in where:
        node = node[key]
    node.update(bad)
    assert any(words in e for e in schema_errors(obj)), schema_errors(obj)


def pinned_torch(text):
    import re

    versions = re.findall(r'torch==(\d+)\.(\d+)', text)
    assert versions, "no torch pin found"
    return [tuple(map(int, v)) for v in versions]


def test_the_images_pin_a_torch_the_code_needs():
    """infra/Dockerfile and ray_cluster.yaml install a torch with torch.mm(out_dtype) (the mixture's fp32 GEMM)
    and at or above pyproject's floor; the CronJob runs the project's image, which carries kubectl."""
    import re

    from macrid.model.mixture import OUT_DTYPE_TORCH

    floor = tuple(map(int, re.search(r'"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text()).groups()))
    for path in (INFRA / "Dockerfile", ROOT / "ray_cluster.yaml"):
        for pin in pinned_torch(path.read_text()):
            assert pin >= OUT_DTYPE_TORCH and pin >= floor, (path, pin)
    images = {c["image"] for _, d in all_manifests() if d["kind"] == "CronJob"
              for c in d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]}
    ray_images = {c["image"] for _, d in all_manifests() if d["kind"] == "RayCluster"
                  for c in d["spec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    assert images == ray_images and "kubectl" in (INFRA / "Dockerfile").read_text()
