"""infra/: the Kubernetes manifests, the IAM policy and the Prometheus alerts, checked offline.

The alert rules go through Prometheus's own checker and unit tests (promtool, from Debian's
prometheus package). No Kubernetes or KubeRay schema is available offline, so the manifests are
checked for what would break a deployment of this project: every job command parses with the job's
real argument parser, the config it names exists and loads, names and namespaces agree across
files, and the IAM policy grants the lake operations the code performs and nothing wider.
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
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == "macrid"
    assert seen == {"train", "export"}


def test_cronjob_submits_the_export_template_and_may_create_rayjobs_only():
    manifests = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in all_manifests())
    cron = manifests[("CronJob", "macrid-nightly-export")]
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
    on an existing cluster (clusterSelector) cannot shut it down: the template must set neither combination."""
    import yaml

    manifests = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in all_manifests())
    job = yaml.safe_load(manifests[("ConfigMap", "macrid-export-rayjob")]["data"]["rayjob.yaml"])
    spec = job["spec"]
    if "ttlSecondsAfterFinished" in spec:
        assert spec.get("shutdownAfterJobFinishes") is True
    if spec.get("clusterSelector"):
        assert not spec.get("shutdownAfterJobFinishes")


@pytest.mark.parametrize("phase,status,rc", [("Complete", "SUCCEEDED", 0), ("Complete", "FAILED", 1),
                                            ("Failed", "FAILED", 1), ("ValidationFailed", "", 1)])
def test_the_submit_script_stops_waiting_on_every_end_state(tmp_path, phase, status, rc):
    """The CronJob's script with a kubectl on PATH that answers with a fixed RayJob state: it ends at once
    with the right exit status instead of waiting out its deadline."""
    import subprocess

    manifests = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in all_manifests())
    pod = manifests[("CronJob", "macrid-nightly-export")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    template = manifests[("ConfigMap", "macrid-export-rayjob")]["data"]["rayjob.yaml"]
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
    assert "delete rayjob/macrid-export-2026-11-20 --ignore-not-found" in calls
    assert f"export 2026-11-28: {phase}" in done.stdout
