"""Submit an ``ldmseg`` command to a Ray cluster as a Ray job (the job submission API).

    ldmseg submit --address http://HEAD:8265 preprocess --source s3://b/coco --output s3://b/shards --config coco
    ldmseg submit --wait train ae --data s3://b/shards --config coco --storage s3://b/ray-results
    ldmseg submit --gpus 1 --wait segment --model models:/ldmseg-ldm@current --input s3://b/photos --output s3://b/seg

What it does, in order, before anything reaches the cluster:

1. the command's own arguments are parsed here with that command's parser: a misspelled flag fails
   on your machine (exit 2), not minutes later in the job;
2. the runtime env is built: the working tree (a source checkout: the folder with ``pyproject.toml``
   and ``pipelines/``) is uploaded as the job's ``working_dir`` without ``runs/``, ``.venv/``,
   ``.git/``, ``tests/``, ``docs/`` and caches, so the job runs the code you have, with the
   configs of ``conf/``; the entrypoint is then ``python -m pipelines.cli COMMAND ...`` run from
   that folder (``--no-upload``: ``ldmseg COMMAND ...`` as installed on the cluster's image);
   variables ``MLFLOW_*``, ``AWS_*``, ``HF_*``, ``HUGGING_FACE_HUB_*`` and ``LDMSEG_*`` of your
   environment are forwarded (``--no-forward-env`` to forward none: then give them to the
   cluster, e.g. from a Kubernetes Secret; forwarded values are visible in the Ray dashboard);
3. the entrypoint asks for ``--cpus`` CPUs and ``--gpus`` GPUs for the job's driver process
   (the workers it starts ask for their own).

The job id is printed on stdout as JSON. ``--wait`` follows the job's logs until it ends and exits
0 only if it SUCCEEDED. ``ldmseg job status|logs|stop|list`` manages jobs afterwards. The address
is ``--address`` or ``RAY_ADDRESS`` (the dashboard's ``http://HOST:8265``); a cluster with token
authentication needs ``RAY_AUTH_MODE=token`` and its token (``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

FORWARDED_PREFIXES = ("MLFLOW_", "AWS_", "HF_", "HUGGING_FACE_HUB_", "LDMSEG_")
UPLOAD_EXCLUDES = ["runs/", ".venv/", ".git/", "tests/", "docs/", "**/__pycache__/", "*.egg-info/",
                   ".pytest_cache/", "build/", "dist/", "*.pyc"]
NOT_SUBMITTABLE = ("submit", "job", "check-infra", "quickstart", "serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.jobs import add_address

    add_address(parser)
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs for the job's driver process (default 1)")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs for the job's driver process (default 0)")
    parser.add_argument("--job-id", default=None, help="a submission id of your own (default: Ray makes one)")
    parser.add_argument("--working-dir", default=None,
                        help="the source tree to upload (default: the checkout this ldmseg runs from, if any)")
    parser.add_argument("--no-upload", action="store_true",
                        help="upload nothing: run the ldmseg installed on the cluster")
    parser.add_argument("--no-forward-env", action="store_true",
                        help="forward no MLFLOW_/AWS_/HF_/LDMSEG_ variables")
    parser.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    parser.add_argument("command", metavar="COMMAND", help="the ldmseg command to run, e.g. preprocess, train")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, as on the command line")


def check_command(command: str, args: list[str]) -> None:
    """Parse ``ldmseg COMMAND ARGS`` with the command's own parser (exit 2 on a usage error)."""
    from pipelines.cli import COMMANDS, command_parser, parse_command_args

    if command not in COMMANDS or command in NOT_SUBMITTABLE:
        choices = [c for c in COMMANDS if c not in NOT_SUBMITTABLE]
        raise SystemExit(f"ldmseg submit: {command!r} cannot be submitted as a job; choose one of "
                         f"{', '.join(choices)} (serve: see infra/serve/ldmseg.yaml and docs/cluster.md)")
    _, parser = command_parser(command)

    def error(message: str):  # one line, like every other input error, instead of argparse's usage block
        raise SystemExit(f"ldmseg submit: the arguments of 'ldmseg {command}' do not parse: {message}; "
                         f"see 'ldmseg {command} --help'")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._subparsers._group_actions if parser._subparsers else []:  # tune's sub-commands
        for sub in action.choices.values():
            sub.error = error  # type: ignore[method-assign]
    parse_command_args(parser, args)


def source_tree(working_dir: str | None) -> Path | None:
    """The source checkout to upload: ``--working-dir``, else the one this code runs from, if any."""
    if working_dir:
        root = Path(working_dir).resolve()
    else:
        root = Path(__file__).resolve().parent.parent
        if not (root / "pyproject.toml").is_file():
            return None  # an installed wheel: nothing to upload
    if not (root / "pipelines" / "cli.py").is_file():
        raise SystemExit(f"ldmseg submit: --working-dir {root} is not an ldmseg source tree (no pipelines/cli.py)")
    return root


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    """The variables a job needs from here: MLflow, S3, Hugging Face, ldmseg's own."""
    return {k: v for k, v in sorted(environ.items()) if k.startswith(FORWARDED_PREFIXES)}


def job_spec(command: str, args: list[str], *, tree: Path | None, cpus: float, gpus: float,
             env: dict[str, str]) -> dict:
    """Keyword arguments of ``JobSubmissionClient.submit_job`` for ``ldmseg COMMAND ARGS``."""
    runtime_env: dict = {"env_vars": env} if env else {}
    if tree is not None:
        runtime_env.update(working_dir=str(tree), excludes=list(UPLOAD_EXCLUDES))
        entrypoint = shlex.join(["python", "-m", "pipelines.cli", command, *args])
    else:
        entrypoint = shlex.join(["ldmseg", command, *args])
    spec = {"entrypoint": entrypoint, "runtime_env": runtime_env or None, "entrypoint_num_cpus": cpus}
    if gpus:
        spec["entrypoint_num_gpus"] = gpus
    return spec


def run(args: argparse.Namespace) -> int:
    if args.cpus < 0 or args.gpus < 0:
        raise SystemExit("ldmseg submit: --cpus and --gpus must be >= 0")
    from pipelines.jobs import client, follow, resolve_address

    address = resolve_address(args.address)
    check_command(args.command, args.args)
    tree = None if args.no_upload else source_tree(args.working_dir)
    env = {} if args.no_forward_env else forwarded_env(dict(os.environ))
    spec = job_spec(args.command, args.args, tree=tree, cpus=args.cpus, gpus=args.gpus, env=env)
    for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk"):  # per-file upload chatter
        logging.getLogger(name).setLevel(logging.ERROR)
    jobs = client(address)
    job_id = jobs.submit_job(submission_id=args.job_id, **spec)
    print(json.dumps({"job_id": job_id, "address": address, "entrypoint": spec["entrypoint"]}), flush=True)
    print(f"submitted {job_id}: follow with 'ldmseg job logs {job_id} --follow', stop with "
          f"'ldmseg job stop {job_id}'", file=sys.stderr)
    if not args.wait:
        return 0
    return 0 if follow(jobs, job_id) == "SUCCEEDED" else 1
