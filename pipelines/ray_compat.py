"""The one module that talks to version-sensitive Ray APIs (Ray 2.60 at the time of writing).

Everything else in ``pipelines/`` calls these helpers, so a Ray upgrade touches this file only.
"""

from __future__ import annotations

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


def init_ray(address: str | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None,
             quiet: bool = True) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray if none is given.

    A no-op when Ray is already initialised in this process (tests share one session).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": dict(WORKER_ENV)},
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": logging.WARNING if quiet else logging.INFO,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray starts workers at nice 15 (below the driver); here the workers do the work, so they
        # run at normal priority (Ray's job submission does the same for its drivers)
        os.environ.setdefault("RAY_worker_niceness", "0")
        if quiet:
            # no INFO/WARNING chatter from Ray's own actors (e.g. Ray Train's placement-group
            # cleaner polls the state API, which needs the dashboard we do not start)
            kwargs["logging_config"] = ray.LoggingConfig(encoding="TEXT", log_level="ERROR")
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


def read_parquet(paths: str | list[str], *, filesystem=None, columns: list[str] | None = None):
    import ray.data

    ds = ray.data.read_parquet(paths, filesystem=filesystem)
    return ds.select_columns(columns) if columns else ds



# --------------------------------------------------------------------------------------------
# Preprocessing (pipelines/preprocess.py)
# --------------------------------------------------------------------------------------------


import contextlib  # noqa: E402  (this block's own import, kept with it)


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
