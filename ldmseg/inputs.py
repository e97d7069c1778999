"""Checks of a command's inputs, run before anything starts (Ray, MLflow, a model load).

Each check raises :class:`InputError` with a message that names the flag, the value and how to
fix the call (``--data runs/x: no such folder; pass the output folder of 'ldmseg preprocess'``);
the CLI (``pipelines.cli``) prints it as one line and exits 2. Checks read as little as they can:
a model folder's ``model.json`` and the headers of its safetensors files, never the weights. Paths that
are URLs (``s3://...``) are only checked for credentials; ``models:/`` and ``runs:/`` URIs only
for their syntax (MLflow resolves them later). Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

_MODEL_URI = re.compile(r"^models:/[^/@\s]+(@[^/@\s]+|/[^/@\s]+)?$")
_RUN_URI = re.compile(r"^runs:/[0-9A-Za-z]+(/\S*)?$")


class InputError(ValueError):
    """A command-line input is unusable; the message names it and says how to fix the call."""


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> Path:
    return Path(path[len("file://"):]) if path.startswith("file://") else Path(path)


def s3_credentials(flag: str, path: str | None) -> None:
    """For an ``s3://`` path: fail unless boto finds credentials or ``AWS_ENDPOINT_URL`` is set."""
    if not path or not str(path).startswith("s3://"):
        return
    if os.environ.get("AWS_ENDPOINT_URL"):
        return
    try:
        import botocore.session
    except ImportError:
        raise InputError(f"{flag} {path}: s3:// paths need s3fs; install it (pip install s3fs)") from None
    if botocore.session.get_session().get_credentials() is None:
        raise InputError(f"{flag} {path}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible server")


def folder(flag: str, path: str, fix: str) -> Path | None:
    """An existing local folder (returned), or a URL (only checked for credentials; ``None``)."""
    if _is_url(path):
        s3_credentials(flag, path)
        return None
    local = _local(path)
    if not local.exists():
        raise InputError(f"{flag} {path}: no such folder; {fix}")
    if not local.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder; {fix}")
    return local


def file(flag: str, path: str, fix: str) -> None:
    """An existing local file, or a URL (only checked for credentials)."""
    if _is_url(path):
        s3_credentials(flag, path)
        return
    local = _local(path)
    if not local.exists():
        raise InputError(f"{flag} {path}: no such file; {fix}")
    if local.is_dir():
        raise InputError(f"{flag} {path}: is a folder, not a file; {fix}")


def output_folder(flag: str, path: str) -> None:
    """A folder a command will write to: anything but an existing file (URLs: credentials)."""
    if _is_url(path):
        s3_credentials(flag, path)
        return
    if _local(path).exists() and not _local(path).is_dir():
        raise InputError(f"{flag} {path}: is an existing file; pass a new or existing folder")


def coco_folder(flag: str, path: str) -> None:
    """A COCO panoptic folder: ``images/``, ``panoptic/`` and ``panoptic.json``."""
    fix = "pass a COCO panoptic folder (images/, panoptic/, panoptic.json), e.g. one written by 'ldmseg synth'"
    local = folder(flag, path, fix)
    if local is not None and not (local / "panoptic.json").is_file():
        raise InputError(f"{flag} {path}: no panoptic.json in this folder; {fix}")


def shards(flag: str, path: str) -> None:
    """The output folder of ``ldmseg preprocess`` (``_manifest.json`` or a ``train/`` folder)."""
    from ldmseg.data.manifest import MANIFEST

    fix = "pass the output folder of 'ldmseg preprocess'"
    local = folder(flag, path, fix)
    if local is not None and not ((local / MANIFEST).is_file() or (local / "train").is_dir()):
        raise InputError(f"{flag} {path}: not a preprocessed folder (no {MANIFEST}); {fix}")


def dataset(flag: str, path: str) -> None:
    """A COCO panoptic folder or the output folder of ``ldmseg preprocess``."""
    from ldmseg.data.manifest import MANIFEST

    fix = "pass a COCO panoptic folder (images/, panoptic/, panoptic.json) or the output of 'ldmseg preprocess'"
    local = folder(flag, path, fix)
    if local is not None and not ((local / "panoptic.json").is_file() or (local / MANIFEST).is_file()):
        raise InputError(f"{flag} {path}: neither panoptic.json nor {MANIFEST} in this folder; {fix}")


def model(flag: str, uri: str) -> None:
    """A model folder with ``model.json`` and readable safetensors headers, or a ``models:/`` /
    ``runs:/`` URI of the right form (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/RUN_ID/PATH``)."""
    if uri.startswith(("models:", "runs:")):
        if not (_MODEL_URI.match(uri) or _RUN_URI.match(uri)):
            raise InputError(f"{flag} {uri}: not a model URI; write models:/NAME@ALIAS (e.g. "
                             "models:/ldmseg-ldm@current), models:/NAME/VERSION or runs:/RUN_ID/PATH")
        return
    fix = "pass a model folder written by 'ldmseg train' (e.g. runs/quickstart/models/ldm) or models:/NAME@ALIAS"
    local = folder(flag, uri, fix)
    if local is None:
        return
    from safetensors import SafetensorError, safe_open

    from ldmseg.checkpoint import MODEL_JSON, read_meta

    try:
        meta = read_meta(local)
    except FileNotFoundError:
        raise InputError(f"{flag} {uri}: no {MODEL_JSON} in this folder; {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # not JSON, another format, a newer version
        raise InputError(f"{flag} {uri}: unreadable {MODEL_JSON} ({exc}); {fix}") from None
    for name, entry in (meta.get("components") or {}).items():
        weights = (entry or {}).get("weights")
        if not weights:
            continue
        path = local / weights
        if not path.is_file():
            raise InputError(f"{flag} {uri}: {weights} is missing ({MODEL_JSON} lists component {name!r}); "
                             "copy the whole model folder")
        try:
            with safe_open(str(path), framework="pt"):
                pass  # the header only: names, shapes and offsets of the tensors
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{flag} {uri}: {weights} is not a readable safetensors file ({exc}); "
                             "the folder is damaged: copy or train the model again") from None


def sampler(name: str, where: str) -> None:
    """``name`` is a registered sampler (:data:`ldmseg.diffusion.sampling.SAMPLERS`)."""
    from ldmseg.diffusion.sampling import SAMPLERS

    if name not in SAMPLERS:
        raise InputError(f"{where} {name}: unknown sampler; choose one of {', '.join(SAMPLERS)}")


def sigma_schedule(sampler_name: str, schedule: str, where: str) -> None:
    """``schedule`` (``sampling.sigma_schedule``) fits sampler ``sampler_name``
    (:func:`ldmseg.diffusion.sampling.check_sigma_schedule`)."""
    from ldmseg.diffusion.sampling import check_sigma_schedule

    try:
        check_sigma_schedule(sampler_name, schedule)
    except ValueError as exc:
        raise InputError(f"{where} {exc}") from None


def steps(n: int, where: str) -> None:
    """A sampling step count (at least 1)."""
    if n < 1:
        raise InputError(f"{where} {n}: need at least 1 sampling step")


def samples(n: int, where: str) -> None:
    """Samples per image (``sampling.num_samples``, at least 1; ``sampling.fusion`` makes one map of them)."""
    if n < 1:
        raise InputError(f"{where} {n}: need at least 1 sample per image (1 = one sample, no medoid)")


def threshold(value: float, where: str) -> None:
    """``mask_th``, ``count_th`` or ``overlap_th``: a fraction in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{where} {value}: must lie in [0, 1] (write 25 % as 0.25)")


def sampling_flags(sampler_name: str | None = None, step_count: int | None = None, *, sample_count: int | None = None,
                   **thresholds: float | None) -> None:
    """``--sampler``, ``--steps``, ``--samples``, ``--mask-th``, ``--count-th`` and ``--overlap-th`` of a
    command (``None``: not given, the model's own value is used)."""
    if sampler_name is not None:
        sampler(sampler_name, "--sampler")
    if step_count is not None:
        steps(step_count, "--steps")
    if sample_count is not None:
        samples(sample_count, "--samples")
    for key, value in thresholds.items():
        if value is not None:
            threshold(value, "--" + key.replace("_", "-"))


def sampling_config(sampling: Any) -> None:
    """The ``sampling`` section of a config (its sampler, steps and thresholds)."""
    sampler(sampling.sampler, "sampling.sampler")
    sigma_schedule(sampling.sampler, sampling.sigma_schedule, "sampling:")
    steps(sampling.steps, "sampling.steps")
    for key, value in sampling.thresholds.items():
        threshold(value, f"sampling.{key}")


def parse_list(flag: str, text: str, cast: Callable[[str], Any], what: str = "values") -> list:
    """``"5,10,20"`` → ``[5, 10, 20]``; a value ``cast`` rejects is an :class:`InputError`
    (``what`` names the expected values in the message, e.g. ``"integers"``)."""
    import argparse

    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        return [cast(x) for x in items]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise InputError(f"{flag} {text}: expected a comma list of {what} ({exc})") from None


def sampling_preset(name_or_path: str | None) -> dict[str, Any]:
    """The options of ``--sampling NAME|FILE`` (:func:`ldmseg.sampling_presets.load_preset`), their
    sampler, steps and thresholds checked; ``{}`` when the flag is not given."""
    from ldmseg.config import SamplingConfig
    from ldmseg.sampling_presets import load_preset

    if not name_or_path:
        return {}
    options = load_preset(name_or_path)
    where = f"--sampling {name_or_path}:"
    if "sampler" in options:
        sampler(options["sampler"], f"{where} sampler")
        if "sigma_schedule" in options:
            sigma_schedule(options["sampler"], options["sigma_schedule"], where)
    if "steps" in options:
        steps(options["steps"], f"{where} steps")
    if "num_samples" in options:
        samples(options["num_samples"], f"{where} num_samples")
    for key in set(SamplingConfig.THRESHOLDS) & set(options):
        threshold(options[key], f"{where} {key}")
    return options
