"""The Ray Train worker of ``ldmseg train``: Ray's template calls around :mod:`ldmseg.training`.

Every worker builds the stage (:class:`~ldmseg.training.state.TrainState`), resumes it from Ray's
checkpoint (or one a killed driver left), wraps it for DDP, reads its dataset shard and runs the
engine's :class:`~ldmseg.training.trainer.Trainer`, which reports through :class:`RayReporter`:
``ray.train.report`` on every rank at the same steps, checkpoints attached on rank 0 (uploaded in
the background where Ray supports it: training goes on meanwhile), and MLflow tracking and
progress lines on rank 0. A checkpoint that turns out incomplete on resume (a crash mid-upload)
is replaced by the newest complete one before it (:func:`resume`).
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from ldmseg.config import from_dict, override
from ldmseg.redact import redact_uri
from ldmseg.logs import get_logger, setup_logging
from ldmseg.training.trainer import Reporter

log = get_logger("train")


def train_worker(config: dict) -> None:
    """The per-worker training function (Ray Train calls it on every worker)."""
    import ray.train
    import ray.train.torch
    import torch

    from ldmseg.training.monitor import monitor_batch
    from ldmseg.precision import enable_cuda_fast_paths
    from ldmseg.training.state import train_config
    from ldmseg.training.trainer import Trainer
    from pipelines import ray_compat

    setup_logging()
    ray_compat.quiet_train_worker()
    cfg, stage = from_dict(config["cfg"]), config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world > 1 and train_config(cfg, stage).time_budget_s:
        # ranks would stop at different steps (and decay the lr on different clocks)
        cfg = override(cfg, {f"train_{stage}.time_budget_s": None})
        if rank == 0:
            log.warning(f"time_budget_s applies to single-worker runs only; ignored with {world} workers "
                        "(set iterations instead)")
    tcfg = train_config(cfg, stage)
    torch.set_num_threads(max(1, tcfg.torch_threads or tcfg.cpus_per_worker))
    device = ray.train.torch.get_device()
    enable_cuda_fast_paths(device)
    # Ray's own checkpoint (a restarted worker group) first, else one an earlier, killed driver left
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray_compat.checkpoint_at(config["resume_from"], config["storage_url"])
    # resuming: the trained module is built empty (no Stable Diffusion load, no random init), the checkpoint fills it
    state = create_state(stage, cfg, config.get("ae_model"), config["tracking_uri"], device,
                         load_pretrained=ckpt is None)
    if ckpt is not None:
        resume(state, ckpt, config["storage_url"], warn=rank == 0)
        if rank == 0:
            log.info(f"resuming {stage} from step {state.step}")
    if world > 1:
        state.wrap(ray.train.torch.prepare_model(state.model, move_to_device=False))
    state.seed_generator(tcfg.seed * 7919 + rank + state.step)
    batches = shard_batches(ray.train.get_dataset_shard("train"), max(1, tcfg.batch_size // world),
                            cfg.data.num_slots, tcfg.seed * 1000 + rank + state.step, device)
    watch = None
    if rank == 0 and tcfg.validate_images > 0 and config.get("val_data"):
        watch = monitor_batch(config["val_data"], config["val_split"], tcfg.validate_images, cfg.data.num_slots, device)
    reporter = RayReporter(stage, tcfg.iterations, config["tracking_uri"], config.get("mlflow_run_id"), rank)
    inputs = {k: redact_uri(v) for k, v in config.get("inputs", {}).items()}
    trainer = Trainer(state, batches, reporter, rank=rank, world_size=world, monitor_batch=watch,
                      extra={"inputs": inputs})
    final_step = trainer.run()
    if rank == 0:
        log.info(f"{stage} finished at step {final_step} in {reporter.seconds():.0f} s")


def resume(state, ckpt, storage: str, *, warn: bool = True) -> str:
    """Load ``ckpt`` (a ``ray.train.Checkpoint`` in run storage ``storage``) into ``state``; returns
    the path of the checkpoint loaded.

    When ``ckpt`` is incomplete (a truncated ``trainer_state.pt`` or safetensors, a missing file:
    :func:`ldmseg.checkpoint.checkpoint_problems`) or fails to load, the newest complete checkpoint
    older than it in the same run is loaded instead, with a warning (``warn``: rank 0 logs it); every
    rank makes the same choice. Raises ``RuntimeError`` when there is none.
    """
    from ldmseg.checkpoint import MODEL_JSON
    from ldmseg.training.state import TRAINER_STATE
    from pipelines import ray_compat

    required = (TRAINER_STATE, MODEL_JSON)
    tried = ckpt
    while tried is not None:
        problems = ray_compat.checkpoint_problems(tried, storage, required)
        if not problems:
            try:
                with tried.as_directory() as folder:
                    state.load(folder)
                return tried.path
            except Exception as e:  # noqa: BLE001 - any failure to load: try the one before
                problems = [f"{type(e).__name__}: {e}"]
        previous = ray_compat.latest_checkpoint(storage, ray_compat.run_name_of(tried), required,
                                                older_than=tried.path)
        if warn:
            instead = f"resuming from the one before, {previous.path}" if previous is not None else "none is older"
            log.warning(f"checkpoint {tried.path} is incomplete ({'; '.join(problems)}): {instead}")
        tried = previous
    raise RuntimeError(f"no complete checkpoint to resume from in the run of {ckpt.path} (the newest is incomplete "
                       "and none before it is complete): delete that run folder to train from step 0")


def create_state(stage: str, cfg, ae_model: str | None, tracking_uri: str, device, *, load_pretrained: bool = True):
    """The stage's :class:`~ldmseg.training.state.TrainState`; an AE given as a ``models:/`` or
    ``runs:/`` URI (several nodes: see ``pipelines.train.cluster_check``) is downloaded by this
    worker from ``tracking_uri`` first, into a folder removed once the AE is loaded."""
    import tempfile
    from pathlib import Path

    from ldmseg.training.state import TrainState
    from pipelines.cluster_paths import MODEL_URIS

    if not (ae_model and ae_model.startswith(MODEL_URIS)):
        return TrainState.create(stage, cfg, ae_model=ae_model, device=device, load_pretrained=load_pretrained)
    from pipelines.tracking import download_model

    with tempfile.TemporaryDirectory(prefix="ldmseg-ae-") as tmp:
        folder = download_model(ae_model, Path(tmp) / "ae", tracking_uri)
        return TrainState.create(stage, cfg, ae_model=str(folder), device=device, load_pretrained=load_pretrained)


PREFETCH_BATCHES_GPU = 2
"""Batches decoded ahead in Ray Data's threads for a GPU worker (1 on CPU workers: their cores train)."""


def shard_batches(shard, batch_size: int, num_slots: int, seed: int, device) -> Iterator[dict]:
    """Endless training batches of ``batch_size`` rows from a Ray Data shard (epoch after epoch),
    slots re-permuted with a numpy generator seeded with ``seed``, on ``device``.

    Decoding runs in Ray Data's prefetch thread, not the training thread. For a GPU the batches are
    compact (uint8 images and slots: ``decode_columns(compact=True)``), pinned and copied without
    blocking; ``train_step`` converts them on the GPU. On a CPU they are decoded to float there."""
    import torch

    from ldmseg.data.parquet_dataset import decode_columns
    from pipelines import ray_compat

    rng = np.random.default_rng(seed)
    gpu = torch.device(device).type == "cuda"
    # Arrow batches: the columnar decoder views raw image bytes without a copy per row
    collate = ray_compat.arrow_collate(
        lambda table: decode_columns({c: table.column(c) for c in table.column_names}, num_slots, rng, compact=gpu))
    while True:
        batches = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device=device,
                                              drop_last=True, local_shuffle_buffer_size=4 * batch_size,
                                              prefetch_batches=PREFETCH_BATCHES_GPU if gpu else 1, pin_memory=gpu):
            batches += 1
            yield batch
        if batches == 0:  # else the next epoch is empty too, and the next: training would spin forever
            raise ValueError(f"this worker's share of the training rows is smaller than its batch of {batch_size} "
                             "rows (whole batches only): use fewer workers, a smaller batch_size, or more data")


class RayReporter(Reporter):
    """``ray.train.report`` at the engine's reports and checkpoints (all ranks); on rank 0 also
    MLflow (metrics, overlay panels) and progress lines.

    Checkpoints: where Ray uploads in the background (:func:`pipelines.ray_compat.async_checkpoint_uploads`)
    the reporter takes ownership of the trainer's staged folder and Ray deletes it after its upload;
    before handing over the next one it waits for the previous upload to end, so at most two
    checkpoints sit in ``checkpoint_dir`` (:attr:`staged_checkpoints`). Otherwise the upload is
    synchronous and the trainer deletes the folder.
    """

    upload_wait_s = 3600.0
    """Longest wait for the previous checkpoint's upload before handing over the next one anyway."""

    def __init__(self, stage: str, iterations: int, tracking_uri: str, mlflow_run_id: str | None, rank: int,
                 *, upload_async: bool | None = None) -> None:
        from pipelines import ray_compat
        from pipelines.tracking import Tracker

        self.stage, self.iterations, self.t0 = stage, iterations, time.time()
        self.tracker = Tracker(tracking_uri, mlflow_run_id) if rank == 0 else None
        self.upload_async = ray_compat.async_checkpoint_uploads() if upload_async is None else upload_async
        self.staged_checkpoints = 2 if self.upload_async else 1
        self._uploading: str | None = None

    def seconds(self) -> float:
        """Seconds since the reporter was made."""
        return time.time() - self.t0

    def report(self, step, metrics):
        from pipelines import ray_compat

        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
            extra = f"  skipped {metrics['skipped_steps']:.0f} (non-finite)" if metrics.get("skipped_steps") else ""
            extra += f"  loss scale {metrics['loss_scale']:.0f}" if "loss_scale" in metrics else ""
            log.info(f"{self.stage} step {step}/{self.iterations}  loss {metrics.get('loss', float('nan')):.4f}  "
                     f"{metrics['samples_per_s']:.1f} samples/s  lr {metrics.get('lr', 0):.2e}{extra}")
        ray_compat.train_report(metrics, upload_async=self.upload_async)

    def monitored(self, step, metrics, panel):
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
            self.tracker.log_image(panel, f"validation/{self.stage}_step_{step:06d}.png")
        key = "val_recon_pq" if self.stage == "ae" else "val_pq"
        log.info(f"{self.stage} step {step}: monitoring {key} {metrics[key]:.3f} ({metrics['val_seconds']:.1f} s)")

    def checkpoint(self, step, metrics, folder):
        from pipelines import ray_compat

        if folder is not None:
            self.wait_for_upload()
        owned = ray_compat.train_report(metrics, folder, upload_async=self.upload_async)
        if owned:
            self._uploading = folder
        return owned

    def wait_for_upload(self, poll_s: float = 0.5) -> float:
        """Wait until the folder of the previous asynchronous upload is gone (Ray deletes it once
        uploaded), at most :attr:`upload_wait_s`; returns the seconds waited."""
        import os

        t0, said = time.time(), False
        while self._uploading is not None and os.path.exists(self._uploading):
            waited = time.time() - t0
            if waited > self.upload_wait_s:
                log.warning(f"the previous checkpoint's upload did not end in {waited:.0f} s "
                            f"({self._uploading} still exists): handing over the next one anyway")
                break
            if not said and waited > 5:
                log.info("waiting for the previous checkpoint's upload before the next one")
                said = True
            time.sleep(poll_s)
        self._uploading = None
        return time.time() - t0
