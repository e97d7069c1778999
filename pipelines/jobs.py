"""``ldmseg job status|logs|stop|list``: the Ray jobs of a cluster (submitted by ``ldmseg submit``).

    ldmseg job status raysubmit_XYZ          # PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (JSON)
    ldmseg job logs raysubmit_XYZ --follow   # the driver's output until the job ends
    ldmseg job stop raysubmit_XYZ
    ldmseg job list

The address is ``--address`` or ``RAY_ADDRESS`` (``http://HEAD:8265``). ``status`` exits 0 for a
job that SUCCEEDED or is still going, 1 for FAILED or STOPPED; ``logs --follow`` exits like it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the cluster's job API, http://HEAD:8265 (default: RAY_ADDRESS)")


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit("ldmseg submit: no cluster given; pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise SystemExit(f"ldmseg submit: --address {address} is not the job API; pass the dashboard's "
                         "http://HEAD:8265 (the GCS address HEAD:6379 is for ray.init)")
    return address.rstrip("/")


def client(address: str):
    """A job API client, or one line saying why the cluster cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, auth errors: all say "cannot use this cluster"
        raise SystemExit(f"ldmseg: cannot reach the Ray job API at {address} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); is the cluster up, and for token "
                         "auth are RAY_AUTH_MODE=token and the token set?") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["status", "logs", "stop", "list"])
    parser.add_argument("job_id", nargs="?", help="the submission id (status, logs, stop)")
    parser.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    add_address(parser)


def follow(jobs, job_id: str, poll_s: float = 2.0) -> str:
    """Print the job's new log lines until it ends; its final status."""
    shown = 0
    while True:
        status = str(jobs.get_job_status(job_id).value)
        logs = jobs.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            info = jobs.get_job_info(job_id)
            print(f"job {job_id}: {status}" + (f" ({info.message})" if info.message else ""), file=sys.stderr)
            return status
        time.sleep(poll_s)


def run(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.job_id:
        raise SystemExit(f"ldmseg job {args.action}: give the job id (from 'ldmseg submit' or 'ldmseg job list')")
    jobs = client(resolve_address(args.address))
    if args.action == "list":
        for job in jobs.list_jobs():
            print(json.dumps({"job_id": job.submission_id, "status": str(job.status.value),
                              "entrypoint": job.entrypoint}))
        return 0
    try:
        info = jobs.get_job_info(args.job_id)
    except RuntimeError as exc:  # the job API answers 404 for an unknown id
        raise SystemExit(f"ldmseg job: no job {args.job_id} on this cluster ({exc}); see 'ldmseg job list'") from exc
    if args.action == "status":
        status = str(info.status.value)
        print(json.dumps({"job_id": args.job_id, "status": status, "message": info.message}))
        return 1 if status in ("FAILED", "STOPPED") else 0
    if args.action == "stop":
        stopped = jobs.stop_job(args.job_id)
        print(json.dumps({"job_id": args.job_id, "stop_requested": bool(stopped)}))
        return 0
    if args.follow:
        return 0 if follow(jobs, args.job_id) == "SUCCEEDED" else 1
    sys.stdout.write(jobs.get_job_logs(args.job_id))
    return 0
