"""Ray Train stages: ``ldmseg train ae`` (mask autoencoder) and ``ldmseg train ldm`` (diffusion).

Each stage is a ``TorchTrainer`` over the Parquet shards of ``ldmseg preprocess``: DDP (gloo on
CPU, nccl on GPU), ``get_dataset_shard`` per worker, metrics reported every
``report_every`` steps, checkpoints (safetensors model folders) every ``checkpoint_every`` steps,
``FailureConfig(max_failures)``. The run is named ``<stage>-<config hash>`` so re-running the same
command resumes from its last checkpoint. The training step itself is ``ldmseg.diffusion.training``:
one code path for plain Python and Ray. Tracking goes to MLflow (see ``pipelines/tracking.py``).

Examples::

    ldmseg train ae  --data runs/shards --config conf/tiny.yaml --run-dir runs/tiny
    ldmseg train ldm --data runs/shards --config conf/tiny.yaml --run-dir runs/tiny \\
        --ae runs/tiny/models/ae          # or models:/ldmseg-ae@current
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ldmseg.config import Config, config_hash, from_dict, load_config, public_dict, redact_uri, to_dict

STAGES = ("ae", "ldm")
REGISTERED = {"ae": "ldmseg-ae", "ldm": "ldmseg-ldm"}
TRAINER_STATE = "trainer_state.pt"
INPUTS_JSON = "ldmseg_inputs.json"
MATERIALIZE_BELOW_BYTES = 2 << 30
MODEL_ALIAS = "current"  # MLflow reserves "latest"; models:/NAME/latest also resolves to the newest version


def _log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def stage_sections(stage: str) -> list[str]:
    """Config sections a stage's result depends on (its run name hashes these)."""
    common = ["data", "mask_ae"]
    return common + ["train_ae"] if stage == "ae" else common + ["image_encoder", "denoiser", "diffusion", "train_ldm"]


@dataclass
class StageInputs:
    """What a stage trains on, resolved and checked before Ray starts (:func:`resolve_inputs`)."""

    data: str
    """Preprocessed output, absolute path or URL (workers run in Ray's own working folder)."""
    data_fingerprint: str
    """:func:`ldmseg.data.manifest.data_fingerprint` of ``data``."""
    train_files: list[str]
    val_split: str
    """``val`` if the shards have one, else ``train`` (then validation only monitors training rows)."""
    cleaned: dict
    ae_model: str | None = None
    """LDM stage: the trained AE's local folder (``models:/`` URIs downloaded)."""
    ae_hash: str | None = None
    """LDM stage: :func:`ldmseg.checkpoint.weights_hash` of the AE."""

    def identity(self) -> dict[str, str | None]:
        return {"data": self.data, "data_fingerprint": self.data_fingerprint, "ae_model": self.ae_model,
                "ae_hash": self.ae_hash}


def run_name(stage: str, cfg: Config, inputs: StageInputs, extra: str = "") -> str:
    """``<stage>-<hash of the config sections it depends on>-<hash of its data (and AE)>``.

    The same command on the same inputs resumes its run; other data or another AE is another run.
    """
    blob = f"{inputs.data_fingerprint}:{inputs.ae_hash or ''}"
    return f"{stage}-{config_hash(cfg, stage_sections(stage))}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}{extra}"


def resolve_inputs(stage: str, cfg: Config, *, data: str, ae_model: str | None, run_dir: Path,
                 tracking_uri: str) -> StageInputs:
    """Resolve and check a stage's inputs without Ray: the shards exist and were made with this
    config's ``data`` section, the AE (LDM stage) is a model folder; fingerprints for the run name."""
    from ldmseg.checkpoint import weights_hash
    from ldmseg.config import ConfigError
    from ldmseg.data.manifest import check_data_config, data_fingerprint, list_split_files, open_fs, read_manifest

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    data = absolute_path(data)
    fs, root = open_fs(data)
    if not fs.isdir(root):
        raise FileNotFoundError(f"--data {data}: no such folder; pass the --output folder of 'ldmseg preprocess'")
    manifest = read_manifest(fs, root)
    if manifest is not None:
        if not manifest.complete:
            raise ConfigError(f"--data {data}: preprocessing did not finish ({root}/_manifest.json says "
                              "complete: false); re-run the same 'ldmseg preprocess' command to finish it")
        check_data_config(manifest, cfg.data, f"--data {data}")
    train_files = list_split_files(fs, root, "train")
    if not train_files:
        raise FileNotFoundError(f"--data {data}: the train split has no Parquet files")
    try:
        val_split = "val" if list_split_files(fs, root, "val") else "train"
    except FileNotFoundError:
        val_split = "train"
    inputs = StageInputs(data=data, data_fingerprint=data_fingerprint(fs, root), train_files=train_files,
                         val_split=val_split, cleaned=dict(manifest.cleaned) if manifest is not None else {})
    if stage == "ldm":
        if not ae_model:
            raise ConfigError("the ldm stage needs --ae MODEL (a trained AE folder or models:/ldmseg-ae@current)")
        if ae_model.startswith(("models:/", "runs:/")):
            from pipelines.tracking import download_model

            ae_model = str(download_model(ae_model, run_dir / "downloads" / "ae", tracking_uri))
        inputs.ae_model = absolute_path(ae_model)
        inputs.ae_hash = weights_hash(inputs.ae_model, "mask_autoencoder")
    return inputs


def _note_other_runs(storage: str, name: str, inputs: StageInputs) -> None:
    """Record this run's inputs next to its checkpoints; say which input changed when the same
    config ran before in this storage on other data or another AE (that run is left as it is)."""
    from ldmseg.data.manifest import open_fs, write_json

    fs, root = open_fs(storage)
    prefix = name.rsplit("-", 1)[0] + "-"
    if fs.isdir(root):
        for other in sorted(fs.ls(root, detail=False)):
            other_name = other.rstrip("/").split("/")[-1]
            path = f"{other}/{INPUTS_JSON}"
            if other_name == name or not other_name.startswith(prefix) or not fs.exists(path):
                continue
            with fs.open(path, "r") as f:
                before = json.load(f)
            changed = [f"{k} {before.get(k)} -> {v}" for k, v in inputs.identity().items()
                       if k.endswith(("fingerprint", "hash")) and before.get(k) != v]
            if changed:
                _log(f"run {other_name} of this config used other inputs ({'; '.join(changed)}): "
                     f"starting a new run {name} instead of resuming it")
    fs.makedirs(f"{root}/{name}", exist_ok=True)
    write_json(fs, f"{root}/{name}/{INPUTS_JSON}", inputs.identity())


@dataclass
class StageResult:
    stage: str
    run_name: str
    model_dir: str
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    seconds: float


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------


def _batches(shard, batch_size: int, num_slots: int, seed: int, device) -> Iterator[dict]:
    """Endless training batches from a Ray Data shard (epoch after epoch), slots re-permuted."""
    import numpy as np

    from ldmseg.data.parquet_dataset import decode_columns

    rng = np.random.default_rng(seed)
    while True:
        # Arrow batches: the columnar decoder views raw image bytes without a copy per row
        for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True,
                                        local_shuffle_buffer_size=4 * batch_size):
            batch = decode_columns({c: table.column(c) for c in table.column_names}, num_slots, rng)
            yield {k: v.to(device) for k, v in batch.items()}


def _validation_batch(data: str, split: str, n: int, num_slots: int, device) -> dict:
    """The first ``n`` rows of ``split`` (stored slots, no re-permutation) as one batch on ``device``."""
    from ldmseg.data.parquet_dataset import ShardDataset, iterate_batches

    batch = next(iterate_batches(ShardDataset(data, split, num_slots, train=False), n, drop_last=False))
    return {k: batch[k].to(device) for k in ("image", "slot_map", "valid")}


def _build_stage(stage: str, cfg: Config, ae_model: str | None, device):
    """→ (trainable module, step function factory inputs, components dict to save, latent scales)."""
    from ldmseg.checkpoint import load_model
    from ldmseg.diffusion.training import LDMComponents
    from ldmseg.models.denoiser import build_denoiser
    from ldmseg.models.image_encoder import ImageEncoder
    from ldmseg.models.mask_autoencoder import MaskAutoencoder

    if stage == "ae":
        ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots).to(device)
        return ae, None
    loaded = load_model(ae_model, device=device)
    mask_ae = loaded.components["mask_autoencoder"].eval().requires_grad_(False)
    image_encoder = ImageEncoder.from_config(cfg.image_encoder).to(device)
    latent_size = cfg.data.resolution // mask_ae.downsample_factor
    denoiser = build_denoiser(cfg.denoiser, mask_ae.latent_channels, image_encoder.out_channels, latent_size).to(device)
    comps = LDMComponents(denoiser=denoiser, mask_ae=mask_ae, image_encoder=image_encoder,
                          latent_scale=float(loaded.latent_scale))
    return denoiser, comps


def train_worker(config: dict) -> None:
    """The per-worker training function (Ray Train calls it on every worker).

    Every worker runs the same ``train_loop`` and calls ``ray.train.report`` at the same steps;
    rank 0 attaches the checkpoints and logs to MLflow.
    """
    import ray.train
    import ray.train.torch
    import torch

    from ldmseg.checkpoint import save_model
    from ldmseg.diffusion import training
    from pipelines import ray_compat
    from pipelines.tracking import Tracker

    ray_compat.quiet_train_worker()
    cfg = from_dict(config["cfg"])
    stage = config["stage"]
    tcfg = cfg.train_ae if stage == "ae" else cfg.train_ldm
    torch.set_num_threads(max(1, tcfg.torch_threads or tcfg.cpus_per_worker))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tcfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    model, comps = _build_stage(stage, cfg, config.get("ae_model"), device)
    if world > 1 and tcfg.time_budget_s:
        # ranks would stop at different steps (and decay the lr on different clocks)
        tcfg = dataclasses.replace(tcfg, time_budget_s=None)
        if rank == 0:
            _log(f"time_budget_s applies to single-worker runs only; ignored with {world} workers "
                 "(set iterations instead)")
    optimizer, lr_scheduler = training.make_optimizer(model.parameters(), tcfg)
    ema = training.make_ema(model, tcfg.ema_decay) if stage == "ldm" else None
    start_step = 0
    # Ray's own checkpoint (a restarted worker group) first, else one an earlier, killed driver left
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"], filesystem=_storage_filesystem(config["storage_url"]))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / TRAINER_STATE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_step = int(state["step"])
        if rank == 0:
            _log(f"resuming {stage} from step {start_step}")
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    if comps is not None:
        comps.denoiser = ddp_model
        comps.ema = ema
    per_worker = max(1, tcfg.batch_size // world)
    batches = _batches(ray.train.get_dataset_shard("train"), per_worker, cfg.data.num_slots,
                       tcfg.seed * 1000 + rank + start_step, device)
    generator = torch.Generator(device=device).manual_seed(tcfg.seed * 7919 + rank + start_step)
    tracker = Tracker(config["tracking_uri"], config.get("mlflow_run_id")) if rank == 0 else None

    if stage == "ae":
        def step_fn(batch):
            return training.ae_train_step(ddp_model, batch, optimizer, cfg, generator=generator,
                                          lr_scheduler=lr_scheduler)
    else:
        def step_fn(batch):
            return training.ldm_train_step(comps, batch, optimizer, cfg, generator=generator,
                                           lr_scheduler=lr_scheduler)

    val_batch = None
    if rank == 0 and tcfg.validate_images > 0 and config.get("val_data"):
        val_batch = _validation_batch(config["val_data"], config["val_split"], tcfg.validate_images,
                                      cfg.data.num_slots, device)

    def validate(step: int) -> dict:
        """Rank 0: PQ on the fixed validation batch, logged with an overlay panel (MLflow)."""
        if val_batch is None:
            return {}
        if state.get("validated") == step:
            return dict(state["val_metrics"])
        from ldmseg import validation

        t = time.time()
        if stage == "ae":
            metrics, panel = validation.validate_ae(model, val_batch, cfg)
        else:
            judged = training.ema_copy(model, ema) if ema is not None else model
            metrics, panel = validation.validate_ldm(comps.mask_ae, comps.image_encoder, judged, comps.latent_scale,
                                                     val_batch, cfg, steps=tcfg.validate_steps)
        metrics["val_seconds"] = time.time() - t
        state["validated"], state["val_metrics"] = step, dict(metrics)
        if tracker is not None:
            tracker.log_metrics(metrics, step)
            tracker.log_image(panel, f"validation/{stage}_step_{step:06d}.png")
        key = "val_recon_pq" if stage == "ae" else "val_pq"
        _log(f"{stage} step {step}: validation {key} {metrics[key]:.3f} on {len(val_batch['image'])} images "
             f"({metrics['val_seconds']:.1f} s)")
        return metrics

    t_start = time.time()
    state = {"t": time.time(), "step": start_step, "final_saved": False}

    def save_checkpoint(step: int, metrics: dict, final: bool) -> None:
        if final:
            seconds = time.time() - t_start
            metrics = {**metrics, **validate(step), "train_seconds": seconds,
                       "train_steps_per_s": (step - start_step) / max(seconds, 1e-9)}
        scale = comps.latent_scale if comps is not None else None
        if stage == "ae":  # every rank draws the same number of batches (keeps the shards in step)
            scale = training.measure_latent_scale(model, (next(batches) for _ in range(4)), cfg.data.num_slots)
        metrics = {**metrics, "latent_scale": float(scale)}
        state["final_saved"] = final
        if rank != 0:
            ray.train.report(metrics)
            return
        if stage == "ae":
            components = {"mask_autoencoder": model}
        else:
            denoiser = training.ema_copy(model, ema) if ema is not None else model
            components = {"mask_autoencoder": comps.mask_ae, "image_encoder": comps.image_encoder,
                          "denoiser": denoiser}
        with tempfile.TemporaryDirectory() as tmp:
            save_model(tmp, cfg, components, latent_scale=float(scale),
                       extra={"stage": stage, "step": step, "final": final,
                              "inputs": {k: redact_uri(v) for k, v in config.get("inputs", {}).items()}})
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_scheduler.state_dict(), "step": step,
                        "ema": ema.state_dict() if ema is not None else None}, Path(tmp) / TRAINER_STATE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def on_report(step: int, metrics: dict) -> None:
        now = time.time()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["step"] = step
        metrics["resumed_from"] = start_step
        metrics["steps_per_s"] = (step - state["step"]) / max(now - state["t"], 1e-9)
        metrics["samples_per_s"] = metrics["steps_per_s"] * tcfg.batch_size
        metrics["world_size"] = world  # DDP ranks in the worker group
        state.update(t=now, step=step)
        if tracker is not None:
            tracker.log_metrics(metrics, step)
            _log(f"{stage} step {step}/{tcfg.iterations}  loss {metrics.get('loss', float('nan')):.4f}  "
                 f"{metrics['samples_per_s']:.1f} samples/s  lr {metrics.get('lr', 0):.2e}")
        ray.train.report(metrics)

    def on_checkpoint(step: int, metrics: dict) -> None:
        metrics = {**{k: float(v) for k, v in metrics.items()}, "step": step, "resumed_from": start_step}
        save_checkpoint(step, metrics, final=step >= tcfg.iterations)

    def on_validate(step: int) -> None:
        if step < tcfg.iterations:  # the final step is validated with the final model
            validate(step)

    final_step = training.train_loop(step_fn, batches, tcfg.iterations, start_step=start_step,
                                     on_report=on_report, report_every=tcfg.report_every,
                                     on_checkpoint=on_checkpoint, checkpoint_every=tcfg.checkpoint_every,
                                     on_validate=on_validate, validate_every=tcfg.validate_every or None,
                                     time_budget_s=tcfg.time_budget_s)
    if not state["final_saved"]:
        # the time budget stopped the loop; a checkpoint already saved at this very step was an
        # intermediate one: save the final model, validated
        save_checkpoint(final_step, {"step": final_step, "resumed_from": start_step,
                                     "stopped_early": float(final_step < tcfg.iterations)}, final=True)
    if rank == 0:
        _log(f"{stage} finished at step {final_step} in {time.time() - t_start:.0f} s")


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------


def _storage_filesystem(storage: str):
    """The pyarrow filesystem the run's storage is accessed with (``None``: local)."""
    if "://" not in storage:
        return None
    import pyarrow.fs as pafs

    from ldmseg.data.manifest import open_fs

    return pafs.PyFileSystem(pafs.FSSpecHandler(open_fs(storage)[0]))


def latest_checkpoint(storage: str, name: str, storage_fs=None):
    """The newest complete checkpoint of run ``name`` under ``storage`` (local or s3://), or None.

    Ray Train resumes a run from its own snapshot, but a driver killed mid-run never writes
    one; the checkpoint folders (named by time) are there all the same, so we look for them.
    """
    import ray.train

    from ldmseg.data.manifest import open_fs

    fs, root = open_fs(f"{storage.rstrip('/')}/{name}")
    fs.invalidate_cache()
    if not fs.isdir(root):
        return None
    dirs = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").split("/")[-1].startswith("checkpoint_"))
    for d in reversed(dirs):
        if fs.exists(f"{d}/{TRAINER_STATE}") and fs.exists(f"{d}/model.json"):
            return ray.train.Checkpoint(d, filesystem=storage_fs)
    return None



def absolute_path(path: str) -> str:
    """A local path made absolute; URLs (``s3://``, ``file://``) and ``models:/`` URIs unchanged."""
    if "://" in path or path.startswith(("models:/", "runs:/")):
        return path
    return str(Path(path).resolve())


def run_train(stage: str, cfg: Config, *, data: str, run_dir: str | Path, ae_model: str | None = None,
              storage_path: str | None = None, tracking_uri: str | None = None, address: str | None = None,
              name_suffix: str = "") -> StageResult:
    """Run one stage to completion (resuming if a run of the same name exists); returns the model.

    Inputs are checked (:func:`resolve_inputs`) before Ray starts; the run name covers the config
    sections the stage depends on, the data's fingerprint and (LDM stage) the AE's weights.
    """
    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    from pipelines.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri, run_dir)
    inputs = resolve_inputs(stage, cfg, data=data, ae_model=ae_model, run_dir=run_dir, tracking_uri=uri)

    import ray.train
    from ray.train.torch import TorchTrainer

    from ldmseg.data.manifest import open_fs
    from ldmseg.data.parquet_dataset import TRAIN_COLUMNS
    from pipelines import ray_compat
    from pipelines.tracking import Tracker, local_artifact_root

    ray_compat.init_ray(address)
    tcfg = cfg.train_ae if stage == "ae" else cfg.train_ldm
    name = run_name(stage, cfg, inputs, name_suffix)
    data, ae_model, files, val_split = inputs.data, inputs.ae_model, inputs.train_files, inputs.val_split
    tracker = Tracker(uri, artifact_root=local_artifact_root(uri, run_dir))
    run_id = tracker.start(cfg.tracking.experiment, name, params=public_dict(cfg),
                           tags={"ldmseg.stage": stage, "ldmseg.data": redact_uri(data),
                                 "ldmseg.data_fingerprint": inputs.data_fingerprint,
                                 "ldmseg.ae_hash": inputs.ae_hash or "", "ldmseg.validation_split": val_split})
    for split, counts in inputs.cleaned.items():
        _log(f"shards {split}: segments turned void while cleaning: {counts['n_small']} small, "
             f"{counts['n_crowd']} crowd, {counts['n_merged']} merged beyond {cfg.data.num_slots - 1} slots")
        tracker.set_tags({f"ldmseg.cleaned.{split}.{k}": str(v) for k, v in counts.items()})
    if val_split == "train" and tcfg.validate_images > 0:
        _log(f"{data} has no val split: the in-training validation reads training rows (it monitors fitting, "
             "not generalisation); preprocess with preprocess.val_fraction > 0 for a held-out val split")

    fs, root = open_fs(data)
    proto = "" if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else f"{fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol}://"
    dataset = ray_compat.read_parquet([proto + f for f in files], columns=TRAIN_COLUMNS)
    total_bytes = sum(fs.size(f) for f in files)
    if total_bytes <= MATERIALIZE_BELOW_BYTES:
        # small data: read once before the workers take their CPUs (Ray Data then needs no CPU
        # for reads while training, and every epoch comes from the object store)
        dataset = dataset.materialize()
    storage = storage_path or str(run_dir / "ray_results")
    storage_fs = None
    if "://" in storage:
        # remote storage through fsspec (s3fs writes small files with one PUT; pyarrow's own S3
        # client uses multipart uploads that some S3-compatible servers reject)
        import pyarrow.fs as pafs

        remote_fs, remote_root = open_fs(storage)
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(remote_fs))
    _note_other_runs(storage, name, inputs)
    resume = latest_checkpoint(storage, name, storage_fs)
    if resume is not None:
        _log(f"found checkpoint {resume.path} of an earlier run of {name}: resuming from it")
    _log(f"stage {stage}: run {name}, {len(files)} shard files, {tcfg.num_workers} worker(s), "
         f"storage {redact_uri(storage)}, MLflow {redact_uri(uri)}")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "stage": stage, "ae_model": ae_model,
                           "tracking_uri": uri, "mlflow_run_id": run_id,
                           "resume_from": resume.path if resume is not None else None,
                           "storage_url": storage, "val_data": data, "val_split": val_split,
                           "inputs": inputs.identity()},
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=remote_root if storage_fs is not None else storage,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tcfg.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own progress lines only
            worker_runtime_env={"env_vars": {
                "OMP_NUM_THREADS": str(tcfg.torch_threads or tcfg.cpus_per_worker),
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),  # else every progress line reaches the driver twice
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if storage_fs is not None:
        remote_fs.invalidate_cache()  # listings cached before training (inputs record, resume) miss the checkpoints
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage} finished without a checkpoint (see {storage}/{name})")
    model_dir = run_dir / "models" / stage
    if model_dir.exists():
        shutil.rmtree(model_dir)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, model_dir, ignore=shutil.ignore_patterns(TRAINER_STATE))
    metrics = dict(result.metrics or {})
    tracker.register(model_dir, REGISTERED[stage], alias=MODEL_ALIAS)
    tracker.finish()
    dt = time.time() - t0
    _log(f"stage {stage} done in {dt:.0f} s: model in {model_dir}")
    return StageResult(stage, name, str(model_dir), metrics, run_id, dt)


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
    res = run_train(args.stage, cfg, data=args.data, run_dir=args.run_dir, ae_model=args.ae,
                    storage_path=args.storage, tracking_uri=args.tracking_uri, address=args.address)
    print(json.dumps({"stage": res.stage, "run_name": res.run_name, "model": res.model_dir,
                      "mlflow_run_id": res.mlflow_run_id, "seconds": round(res.seconds, 1),
                      "metrics": {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}}))
    return 0
