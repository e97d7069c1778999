#!/usr/bin/env python3
"""A real multi-node Ray cluster on one machine, on loopback: head + worker nodes, MLflow, S3.

    sudo .venv/bin/python infra/local/cluster.py up --dir runs/cluster      # ~40 s; prints how to use it
    sudo .venv/bin/python infra/local/cluster.py exec --dir runs/cluster -- ldmseg submit ...
    sudo .venv/bin/python infra/local/cluster.py status --dir runs/cluster
    sudo .venv/bin/python infra/local/cluster.py kill-node worker2 --dir runs/cluster
    sudo .venv/bin/python infra/local/cluster.py down --dir runs/cluster

Every process lives in a private network namespace (``unshare -n``; root needed, as in CI):
outside one, Ray rewrites ``--node-ip-address=127.0.0.1`` to the machine's interface address and
the cluster would listen beyond loopback. Inside it, a supervisor starts, as its own children:

- the head node: ``ray start --head --block`` (GCS, dashboard and job API on 127.0.0.1:8265);
- ``--workers`` worker nodes: ``ray start --address=127.0.0.1:6379 --block``, each with its own
  temp dir (under ``$TMPDIR/ldmseg-ray-HASH``), port block (node manager, object manager, dashboard agent, metrics, runtime env,
  worker ports) and object-store size, and a resource ``node:workerN`` for placement;
- an S3-compatible server (``moto_server``, 127.0.0.1:9000, bucket ``ldmseg``) and
  ``mlflow server`` (127.0.0.1:5000, sqlite store in the cluster folder, artifacts on that S3).

Token authentication is on (``RAY_AUTH_MODE=token``, the token in ``DIR/auth_token``). ``exec``
runs a command inside the namespace with the environment a client needs (``RAY_ADDRESS``,
``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL`` and test credentials, the token). ``down`` signals
the supervisor, which stops exactly the processes it started, by PID (SIGTERM, then SIGKILL of
their process groups after a grace period); nothing else on the machine is touched.
``kill-node`` stops one worker node abruptly (SIGKILL of its process group), to test recovery.
State (PIDs, addresses) is in ``DIR/state.json``; each process logs to ``DIR/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HEAD_PORT, DASHBOARD_PORT, S3_PORT, MLFLOW_PORT = 6379, 8265, 9000, 5000
BUCKET = "ldmseg"
STATE = "state.json"
AWS_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}


def _bin(name: str) -> str:
    """A program of this interpreter's environment (the venv's ``ray``, ``mlflow``, ...)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"cluster: {name} not found next to {sys.executable} or on PATH; run scripts/setup.sh")
    return found


def client_env(root: Path) -> dict[str, str]:
    """The environment of a process that uses the cluster (inside its namespace)."""
    env = dict(os.environ)
    env.update(AWS_TEST_CREDENTIALS)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RAY_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "auth_token"),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{MLFLOW_PORT}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
    })
    return env


def ray_temp_root(root: Path) -> Path:
    """The nodes' temp dirs: short (Ray's socket paths must stay under 108 bytes), one per cluster folder."""
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / f"ldmseg-ray-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def node_command(index: int, *, cpus: int, object_store_mb: int, root: Path) -> list[str]:
    """``ray start --block`` for node ``index`` (0 = head) with its own ports and temp dir."""
    base = 20000 + 1000 * index  # each node's port block: 20000-20999 for the head, ...
    cmd = [_bin("ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
           f"--object-store-memory={object_store_mb * 1024 * 1024}", "--disable-usage-stats",
           f"--node-manager-port={base + 1}", f"--object-manager-port={base + 2}",
           f"--dashboard-agent-listen-port={base + 3}", f"--dashboard-agent-grpc-port={base + 4}",
           f"--metrics-export-port={base + 5}", f"--runtime-env-agent-port={base + 6}",
           f"--min-worker-port={base + 100}", f"--max-worker-port={base + 999}"]
    if index == 0:
        return cmd + ["--head", f"--port={HEAD_PORT}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={DASHBOARD_PORT}", f"--ray-client-server-port={base + 7}",
                      f"--temp-dir={ray_temp_root(root) / 'head'}", '--resources={"node:head": 1}']
    return cmd + [f"--address=127.0.0.1:{HEAD_PORT}", f"--temp-dir={ray_temp_root(root) / f'worker{index}'}",
                  f'--resources={{"node:worker{index}": 1}}']


def _get(url: str, token: str | None = None, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _wait(what: str, check, timeout: float, procs: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} while waiting for {what}; "
                                   f"see its log in logs/{name}.log")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def alive_nodes(token: str) -> int:
    """Alive nodes, from the dashboard's state API."""
    body = json.loads(_get(f"http://127.0.0.1:{DASHBOARD_PORT}/api/v0/nodes?limit=100", token))
    return sum(1 for n in body["data"]["result"]["result"] if n["state"] == "ALIVE")


def supervise(root: Path, workers: int, cpus: int, object_store_mb: int) -> int:
    """Inside the namespace: start every process, record PIDs, wait for SIGTERM, stop them."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    token = os.urandom(32).hex()
    (root / "auth_token").write_text(token)
    (root / "auth_token").chmod(0o600)
    env = client_env(root)
    env["HOME"] = str(root / "home")  # nothing lands in the user's ~/.ray or ~/.config
    Path(env["HOME"]).mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def start(name: str, cmd: list[str]) -> None:
        log = open(root / "logs" / f"{name}.log", "ab")
        procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                       start_new_session=True)  # own process group: killable as a whole

    def write_state(status: str) -> None:
        state = {"status": status, "supervisor": os.getpid(), "pids": {n: p.pid for n, p in procs.items()},
                 "ray_address": env["RAY_ADDRESS"], "gcs": f"127.0.0.1:{HEAD_PORT}",
                 "mlflow": env["MLFLOW_TRACKING_URI"], "s3": env["AWS_ENDPOINT_URL"], "bucket": BUCKET,
                 "workers": workers, "ray_temp": str(ray_temp_root(root))}
        tmp = root / f"{STATE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(root / STATE)

    def on_term(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        start("s3", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT)])
        start("head", node_command(0, cpus=cpus, object_store_mb=object_store_mb, root=root))
        write_state("starting")
        _wait("S3", lambda: _get(f"{env['AWS_ENDPOINT_URL']}/") is not None, 60, procs)
        urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/{BUCKET}", method="PUT"),
                               timeout=5).read()
        start("mlflow", [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
                         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                         "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"])
        _wait("the head node", lambda: alive_nodes(token) == 1, 120, procs)
        for i in range(1, workers + 1):
            start(f"worker{i}", node_command(i, cpus=cpus, object_store_mb=object_store_mb, root=root))
            write_state("starting")
        _wait(f"{workers} worker nodes", lambda: alive_nodes(token) == workers + 1, 120, procs)
        _wait("MLflow", lambda: _get(f"{env['MLFLOW_TRACKING_URI']}/health") == b"OK", 120, procs)
        write_state("ready")
        while not stopping:
            time.sleep(0.5)
    except Exception as exc:  # record why, then stop what was started
        (root / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        write_state("failed")
    finally:
        stop_all(procs)
        write_state("stopped")
    return 0


def descendants(pids: list[int]) -> set[int]:
    """Every process below ``pids`` in the process tree (from ``/proc``): a node's raylet and Ray
    workers, and the drivers of submitted jobs, which Ray starts in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def stop_all(procs: dict[str, subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM each started process (workers first), then SIGKILL what is left of them: their
    process groups and every process that was below them when the stop began."""
    below = descendants([p.pid for p in procs.values() if p.poll() is None])
    order = sorted(procs, key=lambda n: (n == "head", n in ("s3", "mlflow")))
    for name in order:
        if procs[name].poll() is None:
            procs[name].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name in order:
        try:
            procs[name].wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs.values():  # the group: a node's raylet and workers, mlflow's gunicorn
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for pid in below:  # e.g. a job's driver, orphaned in its own session when its node went away
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_state(root: Path) -> dict:
    path = root / STATE
    if not path.is_file():
        raise SystemExit(f"cluster: no cluster in {root} ({path} missing); start one with 'up --dir {root}'")
    return json.loads(path.read_text())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def up(root: Path, workers: int, cpus: int, object_store_mb: int, timeout: float) -> int:
    if os.geteuid() != 0:
        raise SystemExit("cluster: needs root for a private network namespace (unshare -n); run with sudo "
                         "(CI runs as root)")
    if (root / STATE).is_file() and pid_alive(read_state(root)["supervisor"]):
        raise SystemExit(f"cluster: already running in {root}; 'down --dir {root}' first")
    root.mkdir(parents=True, exist_ok=True)
    for stale in (STATE, "error.txt"):
        (root / stale).unlink(missing_ok=True)
    log = open(root / "supervisor.log", "ab")
    sup = subprocess.Popen(["unshare", "-n", "--", sys.executable, str(Path(__file__).resolve()), "_supervise",
                            "--dir", str(root), "--workers", str(workers), "--cpus", str(cpus),
                            "--object-store-mb", str(object_store_mb)],
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads((root / STATE).read_text()) if (root / STATE).is_file() else {}
        if state.get("status") == "ready":
            print(json.dumps(state), flush=True)
            print(f"cluster ready: {workers + 1} Ray nodes, MLflow {state['mlflow']}, S3 {state['s3']} "
                  f"(bucket {BUCKET}), inside a private network namespace. Run clients with:\n"
                  f"  {sys.executable} {__file__} exec --dir {root} -- ldmseg submit ...", file=sys.stderr)
            return 0
        if state.get("status") in ("failed", "stopped") or sup.poll() is not None:
            break
        time.sleep(0.5)
    error = (root / "error.txt").read_text().strip() if (root / "error.txt").is_file() else "timed out"
    down(root)
    raise SystemExit(f"cluster: did not start ({error}); logs in {root / 'logs'}")


def down(root: Path, timeout: float = 60.0) -> int:
    state = read_state(root)
    sup = int(state["supervisor"])
    if pid_alive(sup):
        os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(sup) and time.monotonic() < deadline:
            time.sleep(0.2)
            try:  # reap it when it is our child (up then down in one process)
                os.waitpid(sup, os.WNOHANG)
            except ChildProcessError:
                pass
    left = [p for p in [sup, *read_state(root)["pids"].values()] if pid_alive(p)]
    if left:
        raise SystemExit(f"cluster: processes still alive after {timeout:.0f} s: {left}")
    shutil.rmtree(ray_temp_root(root), ignore_errors=True)  # Ray never cleans its session dirs
    print(f"cluster in {root} stopped", file=sys.stderr)
    return 0


def kill_node(root: Path, name: str) -> int:
    state = read_state(root)
    if not name.startswith("worker") or name not in state["pids"]:
        raise SystemExit(f"cluster: no worker node {name!r}; choose one of "
                         f"{', '.join(n for n in state['pids'] if n.startswith('worker'))}")
    try:
        os.killpg(state["pids"][name], signal.SIGKILL)
    except ProcessLookupError:
        raise SystemExit(f"cluster: {name} is not running (already killed?)") from None
    print(f"killed {name} (process group {state['pids'][name]})", file=sys.stderr)
    return 0


def exec_in(root: Path, command: list[str]) -> int:
    state = read_state(root)
    if state.get("status") != "ready":
        raise SystemExit(f"cluster: not ready (status {state.get('status')}); see {root / 'logs'}")
    if not command:
        raise SystemExit("cluster: exec needs a command after --")
    return subprocess.call(["nsenter", "-t", str(state["supervisor"]), "-n", "--", *command], env=client_env(root))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "exec", "kill-node", "_supervise"])
    parser.add_argument("node", nargs="?", help="kill-node: the worker node (worker1, worker2, ...)")
    parser.add_argument("--dir", type=Path, default=Path("runs/cluster"), help="the cluster's folder")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes besides the head (default 2)")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs per node (default 2)")
    parser.add_argument("--object-store-mb", type=int, default=300, help="object store per node, MiB")
    parser.add_argument("--timeout", type=float, default=240, help="up: seconds to wait for readiness")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []  # exec: everything after --
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    root = args.dir.resolve()
    if args.action == "_supervise":
        return supervise(root, args.workers, args.cpus, args.object_store_mb)
    if args.action == "up":
        return up(root, args.workers, args.cpus, args.object_store_mb, args.timeout)
    if args.action == "down":
        return down(root)
    if args.action == "kill-node":
        return kill_node(root, args.node or "")
    if args.action == "exec":
        return exec_in(root, command)
    print(json.dumps(read_state(root), indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit as exc:
        if isinstance(exc.code, str):  # our own errors: one line, exit 2 (as every ldmseg command)
            print(exc.code, file=sys.stderr)
            sys.exit(2)
        raise
