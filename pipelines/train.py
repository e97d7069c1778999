"""Ray Train stages: ``ldmseg train ae`` (mask autoencoder) and ``ldmseg train ldm`` (diffusion).

Each stage is a ``TorchTrainer`` over the Parquet shards of ``ldmseg preprocess``: DDP (gloo on
CPU, nccl on GPU), ``get_dataset_shard`` per worker, metrics reported every
``report_every`` steps, checkpoints (safetensors model folders) every ``checkpoint_every`` steps,
``FailureConfig(max_failures)``. The run is named ``<stage>-<config hash>`` so re-running the same
command resumes from its last checkpoint. The training itself is the Ray-free engine :mod:`ldmseg.training`;
the worker (``pipelines/train_worker.py``) wraps it in Ray's template calls, the inputs and the run
name are resolved in ``pipelines/train_inputs.py``, and every Ray-version-sensitive call lives in
``pipelines/ray_compat.py``. Tracking goes to MLflow (see ``pipelines/tracking.py``).

Examples::

    ldmseg train ae  --data runs/shards --config conf/tiny.yaml --run-dir runs/tiny
    ldmseg train ldm --data runs/shards --config conf/tiny.yaml --run-dir runs/tiny \\
        --ae runs/tiny/models/ae          # or models:/ldmseg-ae@current
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmseg.checkpoint import MODEL_JSON
from ldmseg.config import Config, load_config, to_dict
from ldmseg.redact import public_dict, redact_uri
from ldmseg.logs import get_logger, setup_logging
from ldmseg.training.build import STAGES
from ldmseg.training.state import TRAINER_STATE, train_config
from pipelines.train_inputs import StageInputs, note_other_runs, resolve_inputs, run_name
from pipelines.train_worker import train_worker

REGISTERED = {"ae": "ldmseg-ae", "ldm": "ldmseg-ldm"}
MATERIALIZE_BELOW_BYTES = 2 << 30
MODEL_ALIAS = "current"  # MLflow reserves "latest"; models:/NAME/latest also resolves to the newest version
log = get_logger("train")


@dataclass
class StageResult:
    stage: str
    run_name: str
    model_dir: str
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    seconds: float


def run_train(stage: str, cfg: Config, *, data: str, run_dir: str | Path, ae_model: str | None = None,
              storage_path: str | None = None, tracking_uri: str | None = None, address: str | None = None,
              name_suffix: str = "") -> StageResult:
    """Run one stage to completion (resuming if a run of the same name exists); returns the model.

    Inputs are checked (:func:`resolve_inputs`) before Ray starts; the run name covers the config
    sections the stage depends on, the data's fingerprint and (LDM stage) the AE's weights.
    """
    setup_logging()
    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    from pipelines.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri, run_dir)
    inputs = resolve_inputs(stage, cfg, data=data, ae_model=ae_model, run_dir=run_dir, tracking_uri=uri)

    from ldmseg.data.manifest import open_fs
    from ldmseg.data.parquet_dataset import TRAIN_COLUMNS
    from pipelines import ray_compat
    from pipelines.cluster_paths import alive_node_count
    from pipelines.tracking import Tracker, local_artifact_root

    ray_compat.init_ray(address)
    storage = storage_path or str(run_dir / "ray_results")
    nodes = alive_node_count()
    ae_model = cluster_check(inputs, storage=storage, tracking_uri=uri, nodes=nodes)
    if ae_model != inputs.ae_model:
        log.info(f"{nodes} nodes: every worker downloads the AE {ae_model} itself")
    tcfg = train_config(cfg, stage)
    if tcfg.use_gpu and not ray_compat.cluster_gpus():
        log.warning(f"train_{stage}.use_gpu is true but this Ray cluster has no GPU now: the workers wait until "
                    f"an autoscaler adds GPU nodes (set train_{stage}.use_gpu=false to train on CPUs)")
    name = run_name(stage, cfg, inputs, name_suffix)
    data, files, val_split = inputs.data, inputs.train_files, inputs.val_split
    tracker = Tracker(uri, artifact_root=local_artifact_root(uri, run_dir))
    run_id = tracker.start(cfg.tracking.experiment, name, params=public_dict(cfg),
                           tags={"ldmseg.stage": stage, "ldmseg.data": redact_uri(data),
                                 "ldmseg.data_fingerprint": inputs.data_fingerprint,
                                 "ldmseg.ae_hash": inputs.ae_hash or "", "ldmseg.validation_split": val_split})
    for split, counts in inputs.cleaned.items():
        log.info(f"shards {split}: segments turned void while cleaning: {counts['n_small']} small, "
                 f"{counts['n_crowd']} crowd, {counts['n_merged']} merged beyond {cfg.data.num_slots - 1} slots")
        tracker.set_tags({f"ldmseg.cleaned.{split}.{k}": str(v) for k, v in counts.items()})
    if val_split == "train" and tcfg.validate_images > 0:
        log.info(f"{data} has no val split: the training-time monitoring reads training rows (it shows fitting, "
                 "not generalisation); preprocess with preprocess.val_fraction > 0 for a held-out val split")

    fs, root = open_fs(data)
    proto = "" if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else f"{fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol}://"
    # files in a new order every epoch (seeded); rows are mixed further by each worker's local shuffle buffer
    dataset = ray_compat.read_parquet([proto + f for f in files], columns=TRAIN_COLUMNS, shuffle_seed=tcfg.seed)
    total_bytes = inputs.train_bytes  # from the manifest (or one listing), not a request per file
    if total_bytes <= MATERIALIZE_BELOW_BYTES:
        # small data: read once before the workers take their CPUs (Ray Data then needs no CPU
        # for reads while training, and every epoch comes from the object store)
        dataset = dataset.materialize()
    note_other_runs(storage, name, inputs)
    resume = ray_compat.latest_checkpoint(storage, name, (TRAINER_STATE, MODEL_JSON))
    if resume is not None:
        log.info(f"found checkpoint {resume.path} of an earlier run of {name}: resuming from it")
    log.info(f"stage {stage}: run {name}, {len(files)} shard files, {tcfg.num_workers} worker(s), "
             f"storage {redact_uri(storage)}, MLflow {redact_uri(uri)}")
    trainer = ray_compat.torch_trainer(
        train_worker,
        {"cfg": to_dict(cfg), "stage": stage, "ae_model": ae_model, "tracking_uri": uri, "mlflow_run_id": run_id,
         "resume_from": resume.path if resume is not None else None, "storage_url": storage, "val_data": data,
         "val_split": val_split, "inputs": inputs.identity()},
        name=name, storage=storage, datasets={"train": dataset}, num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
        cpus_per_worker=tcfg.cpus_per_worker, torch_threads=tcfg.torch_threads or tcfg.cpus_per_worker,
        placement_strategy=tcfg.placement_strategy, num_to_keep=tcfg.num_to_keep, max_failures=tcfg.max_failures)
    result = trainer.fit()
    ray_compat.drop_storage_cache(storage)  # listings cached before training (inputs record, resume) miss the checkpoints
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage} finished without a checkpoint (see {storage}/{name})")
    model_dir = run_dir / "models" / stage
    if model_dir.exists():
        shutil.rmtree(model_dir)
    # the model folder only (model.json, safetensors): not the resume file, most of the checkpoint's bytes
    ray_compat.fetch_checkpoint_files(result.checkpoint, model_dir,
                                      lambda f: f == MODEL_JSON or f.endswith(".safetensors"))
    metrics = dict(result.metrics or {})
    tracker.register(model_dir, REGISTERED[stage], alias=MODEL_ALIAS)
    tracker.finish()
    dt = time.time() - t0
    log.info(f"stage {stage} done in {dt:.0f} s: model in {model_dir}")
    return StageResult(stage, name, str(model_dir), metrics, run_id, dt)


def cluster_check(inputs: StageInputs, *, storage: str, tracking_uri: str, nodes: int) -> str | None:
    """What the Ray Train workers get must be reachable from every node (:mod:`pipelines.cluster_paths`;
    nothing is checked on one node): the shards, the run storage (default ``RUN_DIR/ray_results``),
    the AE and the MLflow store rank 0 logs to. → the AE as the workers get it: on several nodes
    an ``--ae models:/...`` goes to them as its pinned URI (each worker downloads it; the AE is
    small) instead of the driver's download; otherwise the resolved folder."""
    from pipelines.cluster_paths import MODEL_URIS, require_reachable

    ae = inputs.ae_model
    if nodes > 1 and inputs.ae_source and inputs.ae_source.startswith(MODEL_URIS):
        ae = inputs.ae_source
    users = "Ray Train's rank 0" + (" (and every worker, for --ae)" if ae and ae.startswith(MODEL_URIS) else "")
    require_reachable({"--data": inputs.data, "--storage": storage, "--ae": ae}, nodes,
                      tracking_uri=tracking_uri, tracking_users=users)
    return ae


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGES, help="ae: mask autoencoder; ldm: latent diffusion model")
    parser.add_argument("--data", required=True, help="preprocessed output (ldmseg preprocess), local or s3://")
    parser.add_argument("--config", default=None, help="YAML config (e.g. conf/tiny.yaml)")
    parser.add_argument("--run-dir", default="runs/train", help="where models, the MLflow store and results go")
    parser.add_argument("--ae", default=None, help="ldm stage: trained AE folder or models:/ldmseg-ae@current")
    parser.add_argument("--storage", default=None, help="Ray Train storage (local or s3://); default RUN_DIR/ray_results")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI "
                                                             "or sqlite in RUN_DIR)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (resources, memory per GPU, checkpoint size and free space, pretrained "
                             "weights, paths, precision) and exit 1 on what would fail; trains nothing and starts "
                             "no local Ray (pipelines/train_plan.py)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train_ae.iterations=500")


def check_inputs(args: argparse.Namespace, cfg: Config) -> None:
    """The inputs of ``ldmseg train``, checked before Ray starts."""
    from ldmseg import inputs

    inputs.sampling_config(cfg.sampling)  # the ldm stage's validation samples with it
    inputs.shards("--data", args.data)
    if args.stage == "ldm":
        if not args.ae:
            raise inputs.InputError("the ldm stage needs --ae MODEL (the model folder of 'ldmseg train ae', "
                                    "or models:/ldmseg-ae@current)")
        inputs.model("--ae", args.ae)
    inputs.output_folder("--run-dir", args.run_dir)
    if args.storage:
        inputs.output_folder("--storage", args.storage)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_inputs(args, cfg)
    if getattr(args, "dry_run", False):
        from pipelines.train_plan import dry_run

        return dry_run(args, cfg)
    res = run_train(args.stage, cfg, data=args.data, run_dir=args.run_dir, ae_model=args.ae,
                    storage_path=args.storage, tracking_uri=args.tracking_uri, address=args.address)
    print(json.dumps({"stage": res.stage, "run_name": res.run_name, "model": res.model_dir,
                      "mlflow_run_id": res.mlflow_run_id, "seconds": round(res.seconds, 1),
                      "metrics": {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}}))
    return 0
