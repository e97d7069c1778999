"""What a training stage trains on, resolved and checked before Ray starts, and the run it names.

- :func:`resolve_inputs` → :class:`StageInputs`: the shards exist, finished preprocessing and
  were made with this config's ``data`` section; the AE (LDM stage) is a model folder
  (``models:/`` URIs downloaded); fingerprints of both;
- :func:`run_name`: ``<stage>-<config hash>-<inputs hash>``, so the same command on the same
  inputs resumes its run;
- :func:`note_other_runs`: records a run's inputs next to its checkpoints and says which input
  changed when the same config ran before on other ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ldmseg.config import Config, config_hash
from ldmseg.logs import get_logger
from ldmseg.training.build import STAGES

INPUTS_JSON = "ldmseg_inputs.json"
log = get_logger("train")


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
    train_bytes: int
    """Bytes of ``train_files``: from the manifest's ``file_sizes``, else one listing of the folder."""
    train_rows: int | None
    """Rows of ``train_files`` from the manifest's ``file_sizes``; ``None`` for older outputs."""
    val_split: str
    """``val`` if the shards have one, else ``train`` (then validation only monitors training rows)."""
    cleaned: dict
    ae_model: str | None = None
    """LDM stage: the trained AE's folder, absolute or a URL (``models:/`` URIs downloaded)."""
    ae_source: str | None = None
    """LDM stage: the AE as any node can load it: a ``models:/`` URI pinned to its version
    (``models:/NAME/VERSION``) or a ``runs:/`` URI, else the same as ``ae_model``."""
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
    from ldmseg.data.manifest import (check_data_config, data_fingerprint, list_split_files, list_split_shards,
                                      open_fs, read_manifest)

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
    shards = list_split_shards(fs, root, "train", manifest)  # sizes without a request per file
    train_files = [f.path for f in shards]
    if not train_files:
        raise FileNotFoundError(f"--data {data}: the train split has no Parquet files")
    try:
        val_split = "val" if list_split_files(fs, root, "val") else "train"
    except FileNotFoundError:
        val_split = "train"
    rows = [f.rows for f in shards]
    inputs = StageInputs(data=data, data_fingerprint=data_fingerprint(fs, root), train_files=train_files,
                         train_bytes=sum(f.bytes for f in shards),
                         train_rows=None if None in rows else sum(rows),
                         val_split=val_split, cleaned=dict(manifest.cleaned) if manifest is not None else {})
    if stage == "ldm":
        if not ae_model:
            raise ConfigError("the ldm stage needs --ae MODEL (a trained AE folder or models:/ldmseg-ae@current)")
        inputs.ae_source = absolute_path(ae_model)
        if ae_model.startswith(("models:/", "runs:/")):
            from pipelines.tracking import download_model, pin_model_uri

            # pinned: workers that download it themselves (several nodes) get the weights hashed here
            inputs.ae_source = pin_model_uri(ae_model, tracking_uri)[0]
            ae_model = str(download_model(inputs.ae_source, run_dir / "downloads" / "ae", tracking_uri))
        inputs.ae_model = absolute_path(ae_model)
        inputs.ae_hash = weights_hash(inputs.ae_model, "mask_autoencoder")
    return inputs


def note_other_runs(storage: str, name: str, inputs: StageInputs) -> None:
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
                log.info(f"run {other_name} of this config used other inputs ({'; '.join(changed)}): "
                     f"starting a new run {name} instead of resuming it")
    fs.makedirs(f"{root}/{name}", exist_ok=True)
    write_json(fs, f"{root}/{name}/{INPUTS_JSON}", inputs.identity())


def absolute_path(path: str) -> str:
    """A local path made absolute; URLs (``s3://``, ``file://``) and ``models:/`` URIs unchanged."""
    if "://" in path or path.startswith(("models:/", "runs:/")):
        return path
    return str(Path(path).resolve())
