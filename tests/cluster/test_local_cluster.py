"""The pipeline as cluster jobs on a real 3-node Ray cluster (``infra/local/cluster.py``): a head and
two worker nodes started by ``ray start --block`` in a private network namespace, with token auth,
a moto S3 server and an ``mlflow server``. Every stage is submitted through the job API with
``ldmseg submit`` (the working tree uploaded), data and checkpoints live on s3://, runs in the
MLflow server. One worker node is killed while the LDM trains; the job must still finish.

Needs root (``unshare -n``), as CI has. Takes ~5 minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paths import REPO

CLUSTER = REPO / "infra" / "local" / "cluster.py"
TINY = ["--config", "tiny"]


class Cluster:
    """The running cluster: commands run inside its network namespace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # run folders and sweep outputs stay on this machine's disk, which every node here shares
        self.env = {**os.environ, "LDMSEG_SHARED_PATHS": str(root)}

    def run(self, *cmd: str, timeout: float = 600, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(CLUSTER), "exec", "--dir", str(self.root), "--", *cmd],
                              capture_output=True, text=True, timeout=timeout, env=env or self.env, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def python(self, code: str) -> object:
        """Run ``code`` (which prints one JSON value last) inside the namespace; that value."""
        return json.loads(self.run(sys.executable, "-c", code, timeout=120).stdout.strip().splitlines()[-1])

    def submit(self, *args: str, wait: bool = True, timeout: float = 600) -> tuple[str, str]:
        """``ldmseg submit [--wait] ARGS``: (job id, its output)."""
        proc = self.run("ldmseg", "submit", *(["--wait"] if wait else []), *args, timeout=timeout, check=wait)
        line = next(x for x in proc.stdout.splitlines() if x.startswith('{"job_id"'))
        return json.loads(line)["job_id"], proc.stdout + proc.stderr

    def status(self, job_id: str) -> str:
        out = self.run("ldmseg", "job", "status", job_id, check=False).stdout
        return json.loads(out.strip().splitlines()[-1])["status"]

    def logs(self, job_id: str) -> str:
        return self.run("ldmseg", "job", "logs", job_id).stdout

    def s3_keys(self, prefix: str) -> list[str]:
        return self.python(f"import json, s3fs; fs = s3fs.S3FileSystem(); "
                           f"print(json.dumps(sorted(fs.find('ldmseg/{prefix}'))))")


STATE_CODE = """
import json
from ray.util.state import list_actors, list_nodes
A = "http://127.0.0.1:8265"
nodes = {n.node_id: next((k[5:] for k in n.resources_total if k.startswith("node:") and k[5:] in
                          ("head", "worker1", "worker2")), "?") for n in list_nodes(address=A, detail=True)}
alive = sorted(nodes[n.node_id] for n in list_nodes(address=A, filters=[("state", "=", "ALIVE")],
                                                   raise_on_missing_output=False))
workers = [{"node": nodes.get(a.node_id, "?"), "state": a.state, "job": a.job_id}
           for a in list_actors(address=A, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)]
print(json.dumps({"alive": alive, "train_workers": workers}))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the local cluster needs root for a private network namespace (CI runs as root)")
    root = tmp_path_factory.mktemp("cluster")
    up = subprocess.run([sys.executable, str(CLUSTER), "up", "--dir", str(root)], capture_output=True, text=True,
                        timeout=300)
    assert up.returncode == 0, f"cluster up failed:\n{up.stdout}\n{up.stderr}"
    state = json.loads(up.stdout.strip().splitlines()[-1])
    assert state["status"] == "ready" and len(state["pids"]) == 5
    yield Cluster(root)
    down = subprocess.run([sys.executable, str(CLUSTER), "down", "--dir", str(root)], capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 0, down.stderr
    mine = []  # every process the cluster started has the cluster's token path in its environment
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            seen = (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if str(root).encode() in seen or state["ray_temp"].encode() in seen:
            mine.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
    assert not mine, "processes of the cluster left behind:\n" + "\n".join(mine)
    for pid in [state["supervisor"], *state["pids"].values()]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_pipeline_runs_as_jobs_on_three_nodes_and_survives_a_lost_node(cluster):
    runs = cluster.root / "runs"
    assert cluster.python(STATE_CODE)["alive"] == ["head", "worker1", "worker2"]
    cluster.run("ldmseg", "synth", "s3://ldmseg/scenes", "--num-images", "24", "--size", "64", "--seed", "0")
    cluster.run("ldmseg", "synth", "s3://ldmseg/val-scenes", "--num-images", "6", "--size", "64", "--seed", "1")

    # preprocess: S3 in, S3 out, counts reconcile
    cluster.submit("preprocess", "--source", "s3://ldmseg/scenes", "--output", "s3://ldmseg/shards", *TINY)
    manifest = cluster.python("import json, s3fs; print(json.dumps(json.load(s3fs.S3FileSystem()"
                              ".open('ldmseg/shards/_manifest.json'))))")
    assert manifest["complete"] and manifest["written"] == {"train": 24}

    # the AE: 2 workers on different nodes, checkpoints on S3, a run and a registered model in MLflow
    train = ["--data", "s3://ldmseg/shards", *TINY, "--storage", "s3://ldmseg/ray-results"]
    spread = ["train_ae.num_workers=2", "train_ae.placement_strategy=SPREAD", "train_ae.batch_size=8"]
    _, out = cluster.submit("train", "ae", *train, "--run-dir", str(runs / "ae"), "train_ae.iterations=30",
                            "train_ae.checkpoint_every=10", "train_ae.report_every=10", *spread)
    ae_result = json.loads(next(x for x in out.splitlines() if x.startswith('{"stage": "ae"')))
    assert ae_result["metrics"]["step"] == 30
    ae_nodes = {w["node"] for w in cluster.python(STATE_CODE)["train_workers"]}
    assert len(ae_nodes - {"?"}) == 2, f"the AE's 2 workers ran on {ae_nodes}, not on 2 nodes"
    assert any("/checkpoint_" in k for k in cluster.s3_keys(f"ray-results/{ae_result['run_name']}"))

    # the LDM from the registered AE; a worker node that holds one of its workers is killed mid-run
    job_id, _ = cluster.submit("train", "ldm", *train, "--run-dir", str(runs / "ldm"),
                               "--ae", "models:/ldmseg-ae@current", "train_ldm.iterations=40",
                               "train_ldm.checkpoint_every=10", "train_ldm.report_every=10", "train_ldm.max_failures=3",
                               "train_ldm.num_workers=2", "train_ldm.placement_strategy=SPREAD", "train_ldm.batch_size=8",
                               wait=False)
    deadline = time.monotonic() + 300
    # the node goes once a checkpoint of this run is on S3 (the progress line comes before its upload)
    def ldm_checkpoint_on_s3() -> bool:
        keys = cluster.s3_keys("ray-results")
        return any(k.startswith("ldmseg/ray-results/ldm-") and "/checkpoint_" in k for k in keys)

    while not ldm_checkpoint_on_s3():
        assert cluster.status(job_id) in ("PENDING", "RUNNING") and time.monotonic() < deadline, cluster.logs(job_id)
        time.sleep(3)
    # the state API can lag behind the workers under load: read it until both are ALIVE
    while True:
        state = cluster.python(STATE_CODE)
        ldm_nodes = {w["node"] for w in state["train_workers"] if w["state"] == "ALIVE"}
        if len(ldm_nodes - {"?"}) == 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(ldm_nodes - {"?"}) == 2, f"the LDM's 2 workers run on {ldm_nodes}, not on 2 nodes"
    busy = sorted(n for n in ldm_nodes if n.startswith("worker"))
    assert busy, f"no LDM worker on a worker node: {state}"
    subprocess.run([sys.executable, str(CLUSTER), "kill-node", busy[0], "--dir", str(cluster.root)], check=True)
    while cluster.status(job_id) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline + 300, cluster.logs(job_id)[-3000:]
        time.sleep(3)
    logs = cluster.logs(job_id)
    assert cluster.status(job_id) == "SUCCEEDED", logs[-3000:]
    ldm_result = json.loads(next(x for x in logs.splitlines() if x.startswith('{"stage": "ldm"')))
    assert ldm_result["metrics"]["step"] == 40
    assert ldm_result["metrics"]["resumed_from"] >= 10, "the LDM did not restart from a checkpoint after the node loss"
    assert busy[0] not in cluster.python(STATE_CODE)["alive"]

    # a 2-trial sampling sweep (trials on the nodes left), then a segment job writing to S3
    _, out = cluster.submit("tune", "sampling", "--model", "models:/ldmseg-ldm@current", "--data",
                            "s3://ldmseg/val-scenes", "--output", str(runs / "tune"), "--samplers", "ddim",
                            "--steps", "2,4", "--max-images", "3")
    sweep = json.loads(next(x for x in out.splitlines() if x.startswith('{"sweep_id"')))
    assert sweep["n_trials"] == 2 and sweep["n_failed"] == 0
    _, out = cluster.submit("segment", "--model", "models:/ldmseg-ldm@current", "--input",
                            "s3://ldmseg/val-scenes/images", "--output", "s3://ldmseg/seg", "--steps", "2")
    summary = json.loads(next(x for x in out.splitlines() if x.startswith('{"input"')))
    assert summary["segmented"] == 6 and summary["reconciles"] and summary["model_loaded"] == "models:/ldmseg-ldm/1"
    panoptic = cluster.python("import json, s3fs; print(json.dumps(json.load(s3fs.S3FileSystem()"
                              ".open('ldmseg/seg/panoptic.json'))))")
    assert len(panoptic["annotations"]) == 6

    # MLflow (the server): both stages' runs, the sweep's trials, both models registered
    tracked = cluster.python(
        "import json, mlflow; c = mlflow.MlflowClient(); "
        "runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]; "
        "print(json.dumps({'runs': [r.info.run_name for r in runs], "
        "'models': sorted(m.name for m in c.search_registered_models())}))")
    assert ae_result["run_name"] in tracked["runs"] and ldm_result["run_name"] in tracked["runs"]
    assert sum(name.startswith(sweep["sweep_id"]) for name in tracked["runs"]) >= 3  # 2 trials + summary
    assert {"ldmseg-ae", "ldmseg-ldm"} <= set(tracked["models"])
    artifacts = cluster.python(  # the model's files went through the server to S3
        f"import json, mlflow; c = mlflow.MlflowClient(); "
        f"print(json.dumps([f.path for f in c.list_artifacts('{ldm_result['mlflow_run_id']}', 'model')]))")
    assert "model/model.json" in artifacts
    assert any(k.endswith("/model/model.json") for k in cluster.s3_keys("mlflow"))


def test_a_local_path_on_several_nodes_fails_early_with_what_to_pass(cluster, tmp_path):
    """Without LDMSEG_SHARED_PATHS, a folder of the driver's machine is refused before any work."""
    env = {k: v for k, v in cluster.env.items() if k != "LDMSEG_SHARED_PATHS"}
    cluster.run("ldmseg", "synth", str(tmp_path / "scenes"), "--num-images", "2", "--size", "32")
    proc = cluster.run("ldmseg", "submit", "--wait", "preprocess", "--source", str(tmp_path / "scenes"), "--output",
                       "s3://ldmseg/refused", *TINY, check=False, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:]  # the job FAILED
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ldmseg preprocess:"))
    assert str(tmp_path / "scenes") in line and re.search(r"has [23] nodes", line), line
    assert "s3://" in line and "LDMSEG_SHARED_PATHS" in line, line
    assert not cluster.s3_keys("refused")


def test_a_job_can_be_followed_and_stopped(cluster):
    job_id, _ = cluster.submit("synth", "s3://ldmseg/endless", "--num-images", "1000000", "--size", "64", wait=False)
    deadline = time.monotonic() + 120
    while cluster.status(job_id) != "RUNNING":
        assert time.monotonic() < deadline, cluster.logs(job_id)
        time.sleep(1)
    stop = json.loads(cluster.run("ldmseg", "job", "stop", job_id).stdout.strip().splitlines()[-1])
    assert stop == {"job_id": job_id, "stop_requested": True}
    while cluster.status(job_id) == "RUNNING":
        assert time.monotonic() < deadline, cluster.logs(job_id)
        time.sleep(1)
    assert cluster.status(job_id) == "STOPPED"
    assert cluster.run("ldmseg", "job", "status", job_id, check=False).returncode == 1
    listed = [json.loads(x) for x in cluster.run("ldmseg", "job", "list").stdout.splitlines() if x.startswith("{")]
    assert {"job_id": job_id, "status": "STOPPED"}.items() <= next(j for j in listed if j["job_id"] == job_id).items()
