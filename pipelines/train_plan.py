"""``ldmseg train ae|ldm ... --dry-run``: the plan of a training run, and what would make it fail.

:func:`make_plan` looks at everything a run depends on without training and without starting a
local Ray (with ``--address`` or ``RAY_ADDRESS`` it connects to read the cluster's resources;
otherwise it reads this machine's), and :func:`dry_run` prints it, each line marked ``ok``,
``note`` or ``PROBLEM`` with the fix, then exits 1 if any line is a problem (0 otherwise):

- **paths**: where the data, run folder, Ray Train storage, MLflow store and (LDM) AE live;
  the shards are resolved as the run resolves them (:func:`pipelines.train_inputs.resolve_inputs`);
- **resources**: ``num_workers × cpus_per_worker`` against the CPUs there are, ``use_gpu`` against
  the GPUs visible (``torch.cuda.device_count()`` or the cluster's ``GPU`` resource), and the
  precision ``mixed_precision`` resolves to (:func:`ldmseg.precision.resolve_precision`);
- **memory**: the fixed training memory per GPU and one checkpoint's size (:mod:`ldmseg.memory`),
  against a local GPU's memory when there is one;
- **disk**: free space (:func:`disk_checks`) where checkpoints are staged (``train_*.checkpoint_dir``,
  default the system temp folder: up to two checkpoints, one being uploaded while the next is
  written), in local run storage (``num_to_keep`` checkpoints plus the one being written before the
  oldest is deleted) and in the run folder (the final model folder); folders on one filesystem
  share its free space, so their needs are added up;
- **pretrained weights** (LDM stage): ``image_encoder.pretrained`` and ``denoiser.pretrained``: a
  local folder must hold ``config.json`` and the weights; a hub id needs the network unless the
  Hugging Face cache holds it (with ``HF_HUB_OFFLINE`` a miss is a problem); a URL is copied once
  per machine (:mod:`ldmseg.models.pretrained`).

Input errors (a missing ``--data`` folder, a bad override) were reported before, as one line and
exit 2, by ``pipelines.train.check_inputs``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ldmseg.config import Config
from ldmseg.memory import (FREE_SPACE_MARGIN, FREE_SPACE_SLACK, GIB, StageEstimate, checkpoint_space, estimate_stage,
                           space_wanted)
from ldmseg.redact import redact_uri
from ldmseg.training.state import train_config
from pipelines.cluster_paths import local_path

STAGED_CHECKPOINTS = 2
"""Checkpoint folders ``checkpoint_dir`` may hold at once: one uploading, the next being written."""
OK, NOTE, PROBLEM = "ok", "note", "PROBLEM"


@dataclass
class Line:
    """One line of the plan: a section, a label, what was found and, for a problem, the fix."""

    section: str
    label: str
    text: str
    status: str = OK
    fix: str = ""


@dataclass
class TrainPlan:
    """The lines of a stage's plan, in order; :attr:`problems` are what would fail."""

    stage: str
    lines: list[Line] = field(default_factory=list)

    def add(self, section: str, label: str, text: str, status: str = OK, fix: str = "") -> None:
        self.lines.append(Line(section, label, text, status, fix))

    @property
    def problems(self) -> list[Line]:
        return [line for line in self.lines if line.status == PROBLEM]

    def render(self) -> str:
        """The plan as text: one block per section, a summary line at the end."""
        out = [f"ldmseg train {self.stage} --dry-run: the plan (nothing is trained, no local Ray is started)"]
        section = None
        for line in self.lines:
            if line.section != section:
                section = line.section
                out.append(f"[{section}]")
            out.append(f"  {line.status:<8}{line.label:<16}{line.text}")
            if line.fix:
                out.append(f"  {'':<8}{'':<16}-> {line.fix}")
        n = len(self.problems)
        out.append(f"dry run: {n} problem{'s' if n != 1 else ''} (marked PROBLEM): the run would fail" if n else
                   "dry run: no problem found; the same command without --dry-run trains")
        return "\n".join(out)


def gib(n: int) -> str:
    """``n`` bytes in GiB (2^30 bytes), or in MiB, KiB or bytes below one of them."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}" if unit == "GiB" else f"{n / scale:,.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------


@dataclass
class Resources:
    """CPUs and GPUs training can use: this machine's, or a Ray cluster's (``where`` says which)."""

    where: str
    cpus: float
    gpus: float
    gpu_memory: int | None = None
    """Bytes of the smallest visible local GPU (``None``: unknown, e.g. on a cluster)."""
    cluster: bool = False


def local_resources() -> Resources:
    """This machine's CPUs (those this process may run on) and visible CUDA GPUs."""
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    memory = min((torch.cuda.get_device_properties(i).total_memory for i in range(gpus)), default=None)
    return Resources("this machine", float(cpus), float(gpus), memory)


def cluster_resources(address: str | None) -> Resources:
    """The resources of the Ray cluster at ``address`` (or ``RAY_ADDRESS``): connects, never starts one."""
    import ray

    from pipelines import ray_compat

    ray_compat.init_ray(address)
    total = ray.cluster_resources()
    where = redact_uri(address or os.environ.get("RAY_ADDRESS")) or "the Ray cluster"
    return Resources(f"Ray cluster {where}", float(total.get("CPU", 0)), float(total.get("GPU", 0)), None, True)


def resource_lines(plan: TrainPlan, cfg: Config, res: Resources) -> str:
    """Workers, CPUs, GPUs and precision; → the device the workers train on (``cuda`` or ``cpu``)."""
    from ldmseg.precision import resolve_precision

    section = f"train_{plan.stage}"
    tcfg = train_config(cfg, plan.stage)
    cpus = tcfg.num_workers * tcfg.cpus_per_worker
    text = (f"{tcfg.num_workers} worker(s) x {tcfg.cpus_per_worker} CPU = {cpus} CPUs; "
            f"{res.where} has {res.cpus:g}")
    if cpus > res.cpus:
        plan.add("resources", "CPUs", text, PROBLEM,
                 f"Ray Train would wait for CPUs that are not there{' (unless an autoscaler adds nodes)' if res.cluster else ''}: "
                 f"lower {section}.num_workers or {section}.cpus_per_worker")
    else:
        plan.add("resources", "CPUs", text)
    gpu_text = f"{section}.use_gpu={str(tcfg.use_gpu).lower()}; GPUs visible on {res.where}: {res.gpus:g}"
    if tcfg.use_gpu and res.gpus == 0:
        plan.add("resources", "GPUs", gpu_text, PROBLEM,
                 f"no GPU is visible (torch.cuda.device_count() is 0, or the cluster has no GPU resource): set "
                 f"{section}.use_gpu=false, or run on a GPU node / pass --address of a cluster with GPUs")
    elif tcfg.use_gpu and res.gpus < tcfg.num_workers:
        plan.add("resources", "GPUs", f"{gpu_text}; {tcfg.num_workers} workers need one each", PROBLEM,
                 f"Ray Train would wait for GPUs that are not there: set {section}.num_workers={int(res.gpus)} "
                 f"(and keep {section}.batch_size global)")
    elif not tcfg.use_gpu and res.gpus > 0:
        plan.add("resources", "GPUs", gpu_text + " (not used)", NOTE, f"set {section}.use_gpu=true to train on them")
    else:
        plan.add("resources", "GPUs", gpu_text)

    device = "cuda" if tcfg.use_gpu else "cpu"
    mp = tcfg.mixed_precision
    if device == "cuda" and res.cluster and mp == "auto":
        plan.add("resources", "precision", "mixed_precision auto: decided on each worker (bf16 on Ampere or newer, "
                                           "else fp16 with a GradScaler)")
    elif device == "cuda" and res.gpus > 0 and not res.cluster:
        plan.add("resources", "precision", f"mixed_precision {mp} -> {resolve_precision(mp, 'cuda')} on cuda")
    elif device == "cuda":
        plan.add("resources", "precision", f"mixed_precision {mp} on cuda ({'bf16 or fp16' if mp == 'auto' else mp})")
    else:
        resolved = resolve_precision(mp, "cpu")
        if resolved == "fp16":
            plan.add("resources", "precision", "mixed_precision fp16 on cpu: trains in float32 (fp16 needs CUDA)", NOTE,
                     f"set {section}.mixed_precision=bf16 or no")
        else:
            plan.add("resources", "precision", f"mixed_precision {mp} -> {resolved} on cpu"
                     + (" (float32)" if resolved == "no" else ""))
    return device


def grad_scaler_expected(cfg: Config, stage: str, device: str, res: Resources) -> bool:
    """Whether the workers will train with a ``GradScaler`` (fp16 on CUDA; ``auto`` on a GPU we
    cannot inspect counts as fp16, the larger case)."""
    from ldmseg.precision import resolve_precision

    mp = train_config(cfg, stage).mixed_precision
    if device != "cuda":
        return False
    if mp == "auto" and (res.cluster or res.gpus == 0):
        return True
    return resolve_precision(mp, "cuda") == "fp16"


# --------------------------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------------------------


@dataclass
class DiskNeed:
    """Bytes a run writes into a local folder, and why."""

    label: str
    folder: str
    bytes: int
    why: str


def existing_ancestor(path: str | Path) -> Path:
    """``path`` or its nearest existing parent (the filesystem a new folder would be created on)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_checks(needs: list[DiskNeed], usage: Callable[[str], tuple] = shutil.disk_usage) -> list[Line]:
    """One line per need: its folder's free space against what the run writes there. Needs on the
    same filesystem are added up (they share its free space), and each filesystem needs
    :data:`FREE_SPACE_MARGIN` and :data:`FREE_SPACE_SLACK` beyond. ``usage``: ``shutil.disk_usage``
    (or a stand-in with a ``free`` field, in tests)."""
    by_fs: dict[int, list[DiskNeed]] = {}
    for need in needs:
        by_fs.setdefault(os.stat(existing_ancestor(need.folder)).st_dev, []).append(need)
    lines = []
    for group in by_fs.values():
        free = usage(str(existing_ancestor(group[0].folder))).free
        total = sum(n.bytes for n in group)
        want = space_wanted(total)
        for need in group:
            others = ", ".join(n.label for n in group if n is not need)
            shared = f"; {gib(total)} with {others} on the same filesystem" if others else ""
            text = f"{need.folder}: needs {gib(need.bytes)} ({need.why}){shared}; {gib(free)} free"
            if free < want:
                lines.append(Line("disk", need.label, text, PROBLEM,
                                  f"{gib(want)} wanted ({FREE_SPACE_MARGIN:.0%} margin and "
                                  f"{FREE_SPACE_SLACK >> 20} MiB included): free space there or move the folder "
                                  "(train_*.checkpoint_dir, --storage, --run-dir)"))
            else:
                lines.append(Line("disk", need.label, text))
    return lines


def is_local(path: str) -> bool:
    """Whether ``path`` is a local path or ``file:`` URL (:func:`pipelines.cluster_paths.local_path`)."""
    return local_path(path) is not None


# --------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------


def pretrained_line(label: str, source: str | None, subfolder: str | None, built: str) -> Line:
    """Where the pretrained weights ``source`` / ``subfolder`` come from, and whether that works now."""
    from ldmseg.models.pretrained import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, cache_root, hub_offline, kind_of

    if not source:
        return Line("pretrained", label, built)
    where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
    kind = kind_of(source)
    if kind == "local":
        folder = Path(local_path(source)).expanduser() / (subfolder or "")
        missing = [n for n in (CONFIG_NAME,) if not (folder / n).is_file()]
        if not ((folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()):
            missing.append(WEIGHTS_NAME)
        if not folder.is_dir() or missing:
            return Line("pretrained", label, f"local folder {folder}", PROBLEM,
                        f"{'no such folder' if not folder.is_dir() else 'it lacks ' + ', '.join(missing)}: point "
                        f"{label}.pretrained at a diffusers save_pretrained folder (with {label}.subfolder)")
        return Line("pretrained", label, f"local folder {folder}: {CONFIG_NAME} and weights found")
    if kind == "url":
        return Line("pretrained", label, f"{redact_uri(where)}: copied once per machine into {cache_root()} "
                                         "(needs the URL's credentials on every node)", NOTE)
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{subfolder}/" if subfolder else ""
    cached = all(isinstance(try_to_load_from_cache(source, prefix + n), str) for n in (CONFIG_NAME,)) and any(
        isinstance(try_to_load_from_cache(source, prefix + n), str) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME))
    if cached:
        return Line("pretrained", label, f"hub id {where}: in the Hugging Face cache of this machine")
    if hub_offline():
        return Line("pretrained", label, f"hub id {where}: not in the Hugging Face cache and HF_HUB_OFFLINE is on",
                    PROBLEM, f"download it once with the network on (unset HF_HUB_OFFLINE), or set "
                             f"{label}.pretrained to a local save_pretrained folder")
    return Line("pretrained", label, f"hub id {where}: not cached here; each node downloads it from the Hugging "
                                     "Face hub (needs the network)", NOTE)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def tracking_uri_of(args: argparse.Namespace, cfg: Config, run_dir: Path) -> str:
    """The MLflow tracking URI the run would use (as ``pipelines.tracking.resolve_tracking_uri``,
    without creating the run folder)."""
    return (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
            or f"sqlite:///{run_dir / 'mlflow.db'}")


def path_lines(plan: TrainPlan, args: argparse.Namespace, cfg: Config, run_dir: Path, storage: str, uri: str) -> None:
    """Where every path lives; the shards resolved as the run resolves them."""
    from ldmseg.config import ConfigError
    from ldmseg.inputs import InputError
    from pipelines.train_inputs import absolute_path, resolve_inputs

    data = absolute_path(args.data)
    try:
        inputs = resolve_inputs("ae", cfg, data=data, ae_model=None, run_dir=run_dir, tracking_uri=uri)
        rows = f", {inputs.train_rows:,} rows" if inputs.train_rows is not None else ""
        plan.add("paths", "data", f"{redact_uri(data)} ({'local' if is_local(data) else 'remote'}; "
                                  f"{len(inputs.train_files)} train file{'s' if len(inputs.train_files) != 1 else ''}, {inputs.train_bytes / 1e6:,.1f} MB{rows}; "
                                  f"monitoring reads the {inputs.val_split} split)")
    except (ConfigError, InputError, FileNotFoundError, OSError) as exc:
        plan.add("paths", "data", redact_uri(data) or data, PROBLEM, str(exc))
    plan.add("paths", "run dir", f"{run_dir} (models/{plan.stage} is written there)")
    default = "" if args.storage else ", default RUN_DIR/ray_results"
    plan.add("paths", "storage", f"{redact_uri(storage)} ({'local' if is_local(storage) else 'remote'}{default})")
    plan.add("paths", "MLflow", f"{redact_uri(uri)}" + (" (sqlite in the run folder)" if uri.startswith("sqlite:") else ""))
    if plan.stage == "ldm":
        plan.add("paths", "AE model", *ae_status(args.ae))


def ae_status(ae: str | None) -> tuple[str, ...]:
    """``(text[, status, fix])`` of the LDM stage's ``--ae``."""
    from ldmseg.checkpoint import read_meta

    if not ae:
        return ("none", PROBLEM, "the ldm stage needs --ae MODEL")
    if ae.startswith(("models:/", "runs:/")):
        return (f"{ae}: resolved and downloaded through MLflow when the run starts (not by a dry run)",)
    if not is_local(ae):
        return (f"{redact_uri(ae)} (remote model folder)",)
    folder = Path(local_path(ae)).expanduser().resolve()
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError) as exc:
        return (str(folder), PROBLEM, str(exc))
    if not (folder / "mask_autoencoder.safetensors").is_file():
        return (str(folder), PROBLEM, "mask_autoencoder.safetensors missing: pass the model folder of 'ldmseg train ae'")
    step = f", step {meta['step']}" if meta.get("step") is not None else ""
    return (f"{folder} (local model folder{step})",)


def memory_lines(plan: TrainPlan, cfg: Config, est: StageEstimate, res: Resources, device: str) -> None:
    """Fixed memory per GPU and checkpoint size; a local GPU too small is a problem."""
    parts = ", ".join(f"{item.name} {gib(item.bytes)}" for item in est.gpu)
    text = (f"{gib(est.gpu_bytes)} fixed + activations (excluded: they depend on the batch per GPU and gradient "
            f"checkpointing): {parts}")
    section = f"train_{plan.stage}"
    if device == "cuda" and res.gpu_memory is not None and est.gpu_bytes > res.gpu_memory:
        plan.add("memory", "per GPU", text + f"; the GPU has {gib(res.gpu_memory)}", PROBLEM,
                 f"too large for the GPU before any activation: set {section}.mixed_precision, "
                 + (f"{section}.ema_on_cpu=true, " if plan.stage == "ldm" else "") + "or use larger GPUs")
    else:
        on = f"; the GPU has {gib(res.gpu_memory)}" if device == "cuda" and res.gpu_memory is not None else ""
        plan.add("memory", "per GPU" if device == "cuda" else "per worker", text + on)
    if est.host:
        plan.add("memory", "host per worker", f"{gib(est.host_bytes)}: " + ", ".join(i.name for i in est.host))
    files = ", ".join(f"{item.name} {gib(item.bytes)}" for item in est.checkpoint if item.bytes >= 1 << 20)
    plan.add("memory", "checkpoint", f"{gib(est.checkpoint_bytes)} per checkpoint folder ({files})")


def make_plan(args: argparse.Namespace, cfg: Config, resources: Resources | None = None) -> TrainPlan:
    """The plan of ``ldmseg train`` with ``args`` (its parsed arguments) and ``cfg``; ``resources``:
    given, or read from ``--address``/``RAY_ADDRESS``'s cluster, else from this machine."""
    from ldmseg.commands.model_summary import build_on_meta

    stage = args.stage
    plan = TrainPlan(stage)
    tcfg = train_config(cfg, stage)
    run_dir = Path(args.run_dir).expanduser().resolve()
    storage = args.storage or str(run_dir / "ray_results")
    uri = tracking_uri_of(args, cfg, run_dir)
    path_lines(plan, args, cfg, run_dir, storage, uri)

    if resources is None:
        resources = cluster_resources(args.address) if (args.address or os.environ.get("RAY_ADDRESS")) \
            else local_resources()
    device = resource_lines(plan, cfg, resources)
    try:
        modules = build_on_meta(cfg)
    except ValueError as exc:
        plan.add("memory", "models", "cannot be built from the config", PROBLEM, str(exc))
        return plan
    est = estimate_stage(stage, cfg, modules, grad_scaler=grad_scaler_expected(cfg, stage, device, resources))
    memory_lines(plan, cfg, est, resources, device)

    staging = str(Path(tcfg.checkpoint_dir or tempfile.gettempdir()).expanduser())
    unset = "" if tcfg.checkpoint_dir else f" (train_{stage}.checkpoint_dir unset: the system temp folder)"
    where = " on rank 0's node, checked here" if resources.cluster else ""
    needs = [DiskNeed("staging", staging, STAGED_CHECKPOINTS * est.checkpoint_bytes,
                      f"{STAGED_CHECKPOINTS} checkpoints: one uploading, the next being written{unset}{where}")]
    kept, kept_bytes = checkpoint_space(est, tcfg.num_to_keep, tcfg.iterations, tcfg.checkpoint_every)
    if is_local(storage):
        needs.append(DiskNeed("storage", local_path(storage), kept_bytes,
                              f"{kept} checkpoints: num_to_keep {tcfg.num_to_keep} and the one being written"))
    folder_bytes = sum(i.bytes for i in est.checkpoint if i.name != "trainer_state.pt")
    needs.append(DiskNeed("run dir", str(run_dir), folder_bytes, f"the final model folder models/{stage}"))
    plan.lines.extend(disk_checks(needs))
    if not is_local(storage):
        plan.add("disk", "storage", f"{redact_uri(storage)}: remote, {kept} checkpoints of {gib(est.checkpoint_bytes)} "
                                    "(free space not checked)", NOTE)

    if stage == "ldm":
        enc = cfg.image_encoder
        built = ("pixel_unshuffle: no weights" if enc.kind == "pixel_unshuffle" else
                 "none: an AutoencoderKL built from the config (seeded, frozen)")
        plan.lines.append(pretrained_line("image_encoder", None if enc.kind == "pixel_unshuffle" else enc.pretrained,
                                          enc.subfolder, built))
        plan.lines.append(pretrained_line("denoiser", cfg.denoiser.pretrained, cfg.denoiser.subfolder,
                                          "none: the denoiser starts from random weights"))
    else:
        plan.add("pretrained", "none", "the ae stage trains the mask autoencoder from scratch")
    return plan


def dry_run(args: argparse.Namespace, cfg: Config) -> int:
    """Print the plan of ``ldmseg train`` (stdout); → 1 if anything would fail, else 0."""
    plan = make_plan(args, cfg)
    print(plan.render())
    return 1 if plan.problems else 0
