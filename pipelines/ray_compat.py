"""The one module that talks to version-sensitive Ray APIs (Ray 2.60 at the time of writing).

Everything else in ``pipelines/`` calls these helpers, so a Ray upgrade touches this file only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable

import ray

log = logging.getLogger(__name__)

# Environment every Ray worker process gets: one torch/OpenMP thread per CPU it owns
# (two threads on two busy cores ran 10-40x slower; see STACK.md) and quiet MLflow telemetry.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV` plus the driver's Hugging Face variables (``HF_HOME``, ``HF_HUB_OFFLINE``,
    ``HF_HUB_CACHE``, ``HF_TOKEN``, ...) and ``LDMSEG_WEIGHTS_CACHE`` (where pretrained weights are
    found: :mod:`ldmseg.models.pretrained`), without the variables a submitted job's runtime env
    already sets (Ray refuses to merge a job's runtime env with a driver's that sets the same variable)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_env = (job.get("runtime_env") or {}).get("env_vars") or {}
    weights = {k: v for k, v in os.environ.items()
               if k.startswith(("HF_", "HUGGING_FACE_HUB_")) or k == "LDMSEG_WEIGHTS_CACHE"}
    return {k: v for k, v in {**WORKER_ENV, **weights}.items() if k not in job_env}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None,
             quiet: bool = True) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray if none is given.

    A no-op when Ray is already initialised in this process (tests share one session).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": worker_env()},
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": logging.WARNING if quiet else logging.INFO,
    }
    if quiet:
        # no INFO/WARNING chatter from Ray's own actors (e.g. Ray Data's split coordinator, or
        # Ray Train's placement-group cleaner polling the state API of a dashboard we do not start)
        kwargs["logging_config"] = ray.LoggingConfig(encoding="TEXT", log_level="ERROR")
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts workers at nice 15 (below the driver); here the workers do the work, so they
        # run at normal priority (Ray's job submission does the same for its drivers)
        os.environ.setdefault("RAY_worker_niceness", "0")
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
        if temp_dir:
            kwargs["_temp_dir"] = os.path.abspath(temp_dir)
        ray.init(**kwargs)
    quiet_data_progress(quiet)


def quiet_data_progress(quiet: bool = True) -> None:
    """Ray Data progress bars off (we print our own progress); execution logs stay at WARNING."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    logging.getLogger("ray.data").setLevel(logging.WARNING if quiet else logging.INFO)


def quiet_train_worker() -> None:
    """On a Ray Train worker, silence Ray Train V2's per-report INFO line ("Reporting training
    result N: TrainingReport(...)", every metric). Its logger is named after its source file,
    outside ``ray.train``, so ``LoggingConfig`` does not reach it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to silence
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has now (logical ones included; 0 on a CPU-only cluster)."""
    return float(ray.cluster_resources().get("GPU", 0))


def dataset_from_items(items: list[dict]) -> "ray.data.Dataset":
    import ray.data

    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))


def map_batches(ds: "ray.data.Dataset", fn: Callable, *, batch_size: int | None, num_cpus: float = 1,
                fn_kwargs: dict | None = None, batch_format: str = "pandas") -> "ray.data.Dataset":
    """Stateless batch transform in Ray tasks (``batch_size=None``: whole blocks)."""
    return ds.map_batches(fn, batch_size=batch_size, batch_format=batch_format, num_cpus=num_cpus,
                          fn_kwargs=fn_kwargs or {})


def write_parquet(ds: "ray.data.Dataset", path: str, *, filesystem=None, rows_per_file: int,
                  filename_prefix: str) -> None:
    """Write ``ds`` to ``path`` in files of at most ``rows_per_file`` rows named ``<prefix>-*``."""
    from ray.data.datasource import FilenameProvider

    class _Names(FilenameProvider):
        def __init__(self) -> None:
            super().__init__(file_format="parquet")

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{filename_prefix}-{write_uuid}-{task_index:05d}.parquet"

    ds.write_parquet(path, filesystem=filesystem, filename_provider=_Names(),
                     max_rows_per_file=rows_per_file)


def read_parquet(paths: str | list[str], *, filesystem=None, columns: list[str] | None = None,
                 shuffle_seed: int | None = None):
    """Parquet files as a Dataset (only ``columns``). ``shuffle_seed``: the files are read in an
    order drawn from it and the execution's index, so every epoch reads them in a new order."""
    import ray.data
    from ray.data import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(paths, filesystem=filesystem, shuffle=shuffle)
    return ds.select_columns(columns) if columns else ds


# --------------------------------------------------------------------------------------------
# Preprocessing (pipelines/preprocess.py)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_stage_scheduling():
    """Ray Data without per-operator CPU reservation, for the preprocessing pass.

    By default Ray Data reserves a share of the CPUs for each operator; with this pass's single
    compute stage on few CPUs that left one CPU idle at the start (measured on 2 CPUs: one task
    at a time for the first ~1 s of each chunk, 4.1 s instead of 2.7 s for 240 images). The pass
    has nothing to reserve for, so reservation is off while its dataset is built and run, then
    restored (training in the same process keeps Ray Data's default).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = getattr(ctx, "op_resource_reservation_enabled", None)
    if previous is None:  # another Ray version: nothing to change
        yield
        return
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = previous


def arrow_filesystem(fs):
    """An fsspec filesystem as the pyarrow filesystem Ray Data's writers take (local stays native)."""
    import pyarrow.fs as pafs

    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# ------------------------------------------------------------------------------------------
# Ray Train: storage, checkpoints, trainer
# ------------------------------------------------------------------------------------------


def storage_filesystem(storage: str):
    """``(path, pyarrow filesystem)`` Ray Train stores a run under ``storage`` with: local folders
    as they are (filesystem ``None``); URLs through fsspec (s3fs writes small files with one PUT;
    pyarrow's own S3 client uses multipart uploads that some S3-compatible servers reject)."""
    if "://" not in storage:
        return storage, None
    from ldmseg.data.manifest import open_fs

    fs, root = open_fs(storage)
    return root, arrow_filesystem(fs)


def drop_storage_cache(storage: str) -> None:
    """Forget fsspec's listings of ``storage`` (made before training, they miss its new checkpoints)."""
    if "://" in storage:
        from ldmseg.data.manifest import open_fs

        open_fs(storage)[0].invalidate_cache()


def checkpoint_at(path: str, storage: str):
    """The ``ray.train.Checkpoint`` of folder ``path`` in the run storage ``storage``."""
    import ray.train

    return ray.train.Checkpoint(path, filesystem=storage_filesystem(storage)[1])


def latest_checkpoint(storage: str, name: str, required: tuple[str, ...], *, older_than: str | None = None):
    """The newest complete checkpoint of run ``name`` under ``storage`` (local or s3://), or None.

    Complete: every file of ``required`` is there and none is cut short
    (:func:`ldmseg.checkpoint.checkpoint_problems`: safetensors headers against file sizes, the
    zip directory of ``trainer_state.pt``); an incomplete one (e.g. a crash mid-upload) is skipped
    with a warning in favour of the one before. ``older_than``: a checkpoint path (or folder
    name); only checkpoints older than it are considered (the fallback when that one fails to load).

    Ray Train resumes a run from its own snapshot, but a driver killed mid-run never writes
    one; the checkpoint folders (``checkpoint_<time>``) are there all the same, so we look for them.
    """
    from ldmseg.checkpoint import checkpoint_problems
    from ldmseg.data.manifest import open_fs

    fs, root = open_fs(f"{storage.rstrip('/')}/{name}")
    fs.invalidate_cache()
    if not fs.isdir(root):
        return None
    dirs = sorted(p.rstrip("/") for p in fs.ls(root, detail=False)
                  if p.rstrip("/").split("/")[-1].startswith("checkpoint_"))
    limit = older_than.rstrip("/").split("/")[-1] if older_than else None
    for d in reversed(dirs):
        if limit is not None and d.split("/")[-1] >= limit:
            continue
        problems = checkpoint_problems(d, required, fs=fs)
        if not problems:
            return checkpoint_at(d, storage)
        log.warning(f"skipping incomplete checkpoint {d.split('/')[-1]} of {name}: {'; '.join(problems)}")
    return None


def checkpoint_problems(checkpoint, storage: str, required: tuple[str, ...]) -> list[str]:
    """:func:`ldmseg.checkpoint.checkpoint_problems` of a ``ray.train.Checkpoint`` of run storage
    ``storage`` (read in place: nothing is downloaded but headers)."""
    from ldmseg.checkpoint import checkpoint_problems as problems
    from ldmseg.data.manifest import open_fs

    fs = open_fs(storage)[0] if "://" in storage else None
    return problems(checkpoint.path if fs is not None else f"file://{checkpoint.path}", required, fs=fs)


def run_name_of(checkpoint) -> str:
    """The run (experiment) name of a checkpoint in Ray Train's storage: its parent folder's name."""
    return checkpoint.path.rstrip("/").split("/")[-2]


def async_checkpoint_uploads() -> bool:
    """Whether ``ray.train.report`` can upload a checkpoint in the background
    (``checkpoint_upload_mode=ASYNC``: Ray Train V2, the default since Ray 2.5x; not with
    ``RAY_TRAIN_V2_ENABLED=0``)."""
    import ray.train

    try:
        from ray.train.v2._internal.constants import is_v2_enabled
    except ImportError:
        return False
    return is_v2_enabled() and hasattr(ray.train, "CheckpointUploadMode")


def train_report(metrics: dict, folder: str | None = None, *, upload_async: bool = False) -> bool:
    """``ray.train.report(metrics)`` with the checkpoint folder ``folder`` (or none); returns whether
    Ray took ownership of ``folder``.

    ``upload_async`` (see :func:`async_checkpoint_uploads`): the report returns at once, Ray uploads
    in a background thread (one upload at a time, reports kept in order) and deletes ``folder``
    after the upload (``delete_local_checkpoint_after_upload``): keep it until then. Metric-only
    reports go the same way (a synchronous report would wait for the upload before it). Otherwise
    the upload is done when this returns and ``folder`` is the caller's to delete.
    """
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder is not None else None
    if upload_async:
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        return checkpoint is not None
    ray.train.report(metrics, checkpoint=checkpoint)
    return False


def fetch_checkpoint_files(checkpoint, dest, keep: Callable[[str], bool]) -> list[str]:
    """Copy the files of ``checkpoint`` (a ``ray.train.Checkpoint``, local or remote) whose names
    pass ``keep`` into the local folder ``dest`` (created); returns their names. Only those files
    are read (not ``as_directory()``, which downloads the whole checkpoint)."""
    from pathlib import Path

    import pyarrow.fs as pafs

    fs = checkpoint.filesystem or pafs.LocalFileSystem()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for info in fs.get_file_info(pafs.FileSelector(checkpoint.path.rstrip("/"), recursive=False)):
        if info.type == pafs.FileType.File and keep(info.base_name):
            pafs.copy_files(info.path, str(dest / info.base_name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            names.append(info.base_name)
    return sorted(names)


def arrow_collate(fn: Callable):
    """A ``collate_fn`` for ``iter_torch_batches`` that hands ``fn`` each batch as a ``pyarrow.Table``."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Arrow(ArrowBatchCollateFn):
        def __call__(self, batch):
            return fn(batch)

    return _Arrow()


def torch_trainer(train_fn: Callable, config: dict, *, name: str, storage: str, datasets: dict, num_workers: int,
                  use_gpu: bool, cpus_per_worker: int, torch_threads: int, num_to_keep: int, max_failures: int,
                  placement_strategy: str = "PACK"):
    """A ``TorchTrainer`` running ``train_fn(config)`` on ``num_workers`` workers, its run ``name``
    stored under ``storage`` (keeping ``num_to_keep`` checkpoints, restarting failed workers up to
    ``max_failures`` times); workers log at WARNING (the project prints its own progress)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    path, filesystem = storage_filesystem(storage)
    return TorchTrainer(
        train_fn,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker},
                                               placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {
                "OMP_NUM_THREADS": str(torch_threads),
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),  # else every progress line reaches the driver twice
        datasets=datasets,
    )


# ------------------------------------------------------------------------------------------
# Batch inference (pipelines/segment.py)
# ------------------------------------------------------------------------------------------


def read_binary_files(paths: list[str], *, filesystem=None) -> "ray.data.Dataset":
    """The bytes of ``paths`` (columns ``bytes`` and ``path``; paths as the filesystem names them,
    without ``s3://``), decoded by nobody: a bad file never fails a block."""
    import ray.data

    return ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem,
                                      override_num_blocks=max(1, min(len(paths), 200)))


def map_batches_actors(ds: "ray.data.Dataset", cls: type, *, batch_size: int, min_actors: int, max_actors: int,
                       num_cpus: float, num_gpus: float, constructor_kwargs: dict,
                       batch_format: str = "numpy") -> "ray.data.Dataset":
    """``cls`` (a callable class: built once per actor) over batches, on an autoscaling actor pool."""
    import ray.data

    return ds.map_batches(cls, batch_size=batch_size, batch_format=batch_format,
                          compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
                          num_cpus=num_cpus, num_gpus=num_gpus or None, fn_constructor_kwargs=constructor_kwargs)


def assigned_device() -> str:
    """``cuda:K`` for the first GPU Ray assigned to this worker (Ray sets ``CUDA_VISIBLE_DEVICES``,
    so that is ``cuda:0``), else ``cpu``."""
    import torch

    return "cuda:0" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def worker_threads() -> int:
    """CPUs Ray reserved for this worker (at least 1): its torch threads."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside a worker
        cpus = 1
    return max(1, int(cpus))
