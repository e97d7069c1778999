"""Typed configuration: one dataclass per concern, loaded from YAML with ``key=value`` overrides.

Every key is validated on load (:mod:`ldmseg.typed`): an unknown key or a value of the wrong type
raises :class:`ConfigError` naming the dotted key and what was expected. The resolved config is a
plain tree of dataclasses; :func:`override` sets dotted keys (the one override path), ``to_dict``
turns a config back into YAML-able data (stored with every checkpoint and MLflow run) and
:func:`config_hash` names runs deterministically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional

import yaml

from ldmseg.config_files import find_config
from ldmseg.typed import ConfigError, build, merge, nest, to_dict
from ldmseg.segment_config import SegmentConfig
from ldmseg.train_config import LDMTrainConfig, TrainConfig
from ldmseg.serve_config import ServeConfig


@dataclass
class DataConfig:
    """Targets and encoding (docs/method.md#targets-and-encoding)."""

    resolution: int = 64
    """Training resolution H = W in pixels, after aspect-preserving resize and padding."""
    num_slots: int = 32
    """S id slots, slot 0 = void; a power of two so that ids fit log2(S) bit planes."""
    min_segment_area: int = 10
    """Segments under this many pixels *at the training resolution* become void (in the shards, the
    AE reconstruction score and the validation targets): a segment resized below it is no target."""
    resize_mode: Literal["pad", "squash"] = "pad"
    """``pad`` keeps the aspect ratio and pads (with a valid-pixel mask); ``squash`` is the paper's."""

    @property
    def num_bits(self) -> int:
        return int(math.log2(self.num_slots))

    def validate(self) -> None:
        if self.num_slots < 2 or self.num_slots & (self.num_slots - 1):
            raise ConfigError(f"data.num_slots must be a power of two >= 2, got {self.num_slots}")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a multiple of 8, got {self.resolution}")


@dataclass
class SynthConfig:
    """Synthetic scenes in exact COCO panoptic format (``ldmseg synth``)."""

    num_images: int = 64
    size: int = 64
    """Image width in pixels (and height, unless ``height`` is set)."""
    height: Optional[int] = None
    """Image height in pixels; ``None``: square images of ``size``."""
    seed: int = 0
    min_things: int = 2
    """Fewest thing shapes drawn per image (occlusion may hide some entirely)."""
    max_things: int = 6
    max_stuff: int = 3
    """1 to ``max_stuff`` stuff regions (bands) split the background; at most 5."""
    void_fraction: float = 0.05
    """Target fraction of void pixels, reached with thin void outlines around things."""
    crowd_prob: float = 0.1
    """Probability that an image has one crowd segment (a cluster of small shapes, iscrowd=1)."""
    shared_colour_prob: float = 0.3
    """Probability that a thing reuses an earlier thing's colour (instances told apart by shape only)."""


@dataclass
class MaskAEConfig:
    """Shallow mask autoencoder (docs/method.md#mask-autoencoder)."""

    widths: tuple[int, ...] = (16, 32, 64)
    """Encoder widths; len(widths) - 1 stride-2 stages give the downsampling factor."""
    latent_channels: int = 4
    latent_noise: float = 0.0
    """Std of Gaussian noise added to latents while training, in units of the std of the batch's latents
    (one encoder pass: the std is read from the same latents, without gradient)."""
    decoder_full_resolution: bool = False
    """False: the paper's decoder, logits at 1/2 resolution upsampled bilinearly. True: one more
    ConvTranspose stage (to ``widths[0]`` channels) decodes the logits at full resolution, so
    1–2 px structures (thin COCO things at a small resolution) can be drawn."""
    random_map_fraction: float = 0.0
    """Share of each AE training batch replaced by procedural COCO-like maps
    (:mod:`ldmseg.data.random_maps`): outlines, sizes and segment counts the dataset may not show."""
    train_crop: Optional[int] = None
    """Side of the random square window each AE training map is cut to (:mod:`ldmseg.data.crops`),
    a multiple of the downsampling factor, at most ``data.resolution``; None trains on whole maps.
    The AE is fully convolutional, so it still encodes whole maps; a step costs about
    ``(train_crop / resolution)²`` of a whole-map step. Scale ``num_points`` with the crop's area."""
    num_points: int = 1024
    """Points sampled per image for the loss (112² at COCO scale)."""
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    ce_weight: float = 1.0
    bce_weight: float = 1.0
    dice_weight: float = 1.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def validate(self) -> None:
        if not 0.0 <= self.random_map_fraction <= 1.0:
            raise ConfigError(f"mask_ae.random_map_fraction must lie in [0, 1], got {self.random_map_fraction}")
        f = self.downsample_factor
        if self.train_crop is not None and (self.train_crop < f or self.train_crop % f):
            raise ConfigError(f"mask_ae.train_crop must be a positive multiple of the AE's downsampling factor {f} "
                              f"(2 ** (len(mask_ae.widths) - 1)), got {self.train_crop}; or null for whole maps")


@dataclass
class ImageEncoderConfig:
    """Frozen image encoder: a diffusers ``AutoencoderKL`` (Stable Diffusion's ``vae/``).

    ``pixel_unshuffle`` is a parameter-free, lossless alternative for CPU-scale work: the image is
    rearranged into (3·f², H/f, W/f) and the denoiser's learned image stem does the rest.
    """

    kind: Literal["autoencoder_kl", "pixel_unshuffle"] = "autoencoder_kl"
    downsample_factor: int = 4
    """For ``pixel_unshuffle`` only (``autoencoder_kl``: 2^(len(block_out_channels) - 1))."""
    pretrained: Optional[str] = None
    """Local ``save_pretrained`` directory or hub id; ``None`` builds from the fields below."""
    subfolder: Optional[str] = None
    """E.g. ``vae`` for a full Stable Diffusion repository."""
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    scaling_factor: float = 0.18215


@dataclass
class DenoiserConfig:
    """Conditional denoiser: input [noisy mask latent | image latent | self-conditioning x̂₀]."""

    kind: Literal["unet2d", "stable-diffusion"] = "unet2d"
    pretrained: Optional[str] = None
    """For ``stable-diffusion``: local directory or hub id of the SD UNet (``None``: from config)."""
    subfolder: Optional[str] = None
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (False, True)
    """Per level: whether the block has self-attention."""
    attention_head_dim: int = 32
    image_stem_channels: int = 32
    """Width of a learned conv stem applied to the image latent (0: feed it raw)."""
    self_condition: bool = True
    freeze_time_embedding: bool = False
    gradient_checkpointing: bool = False
    sd_config: Optional[str] = None
    """For a from-config SD UNet: ``sd-v1`` reproduces Stable Diffusion v1.x's UNet shape."""


@dataclass
class DiffusionConfig:
    """Noise process and loss (docs/method.md#latent-diffusion-model)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    min_snr_gamma: Optional[float] = 5.0
    self_condition_prob: float = 0.5
    ae_aux_weight: float = 0.0
    """Weight of an auxiliary cross-entropy through the frozen AE decoder on x̂₀ (0: off)."""
    slot_order: Literal["random", "raster", "grid"] = "random"
    """How the diffusion targets number an image's segments. ``random``: the stored slots,
    re-permuted per sample (the paper; the model learns that id values mean nothing). ``raster``:
    slots 1, 2, … in reading order of each segment's first pixel, so the target is a function of
    the segmentation alone (:func:`ldmseg.data.slots.raster_slots`). ``grid``: the slot of the
    grid cell that holds the segment's first pixel (:func:`ldmseg.data.slots.grid_slot_lut`), a
    function of the segment's own place rather than of its rank. The mask AE is trained on
    random slots either way."""
    segment_weight_power: float = 0.0
    """p of the small-segment loss weighting (Pix2Seq-D's mask-size weighting): a latent cell's
    loss weight is the largest (A / (H·W))^(−p) over the segments among its f×f pixels, A a
    segment's area in pixels (:func:`ldmseg.training.losses.latent_weights`). 0: every cell that
    holds a segment weighs 1, as in the paper."""

    def validate(self) -> None:
        if not 0.0 <= self.segment_weight_power <= 2.0:
            raise ConfigError(f"diffusion.segment_weight_power must lie in [0, 2], got {self.segment_weight_power} "
                              "(0 turns the small-segment weighting off; Pix2Seq-D uses about 0.2)")


@dataclass
class SamplingConfig:
    """Sampling and post-processing (docs/method.md#sampling-and-post-processing).

    Its fields are the whole sampling vocabulary: every sampling option (``Segmenter.segment``
    keywords, ``ldmseg tune sampling`` search spaces, named sampling configs of
    :mod:`ldmseg.sampling_presets`) is one of them and is applied with :func:`with_sampling`.
    """

    THRESHOLDS: ClassVar[tuple[str, ...]] = ("mask_th", "count_th", "overlap_th")
    """The post-processing thresholds (:func:`ldmseg.postprocess.postprocess` keywords), fractions in [0, 1]."""

    sampler: str = "ddim"
    steps: int = 50
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    sigma_schedule: Literal["default", "karras", "exponential", "beta", "lu"] = "default"
    """The sampler's noise levels (samplers dpmsolver++, dpmsolver++-sde, unipc, euler, heun):
    ``default`` the timesteps of ``timestep_spacing``; ``karras`` Karras et al. sigmas;
    ``exponential`` log-uniform sigmas; ``beta`` Beta(0.6, 0.6) sigmas; ``lu`` uniform log-SNR
    steps (dpmsolver++ and dpmsolver++-sde only)."""
    eta: float = 0.0
    seed: int = 0
    self_condition: bool = True
    mask_th: float = 0.5
    count_th: float = 0.002
    """Minimum segment area as a fraction of the image area (512 px of 512² ≈ 0.002)."""
    overlap_th: float = 0.5
    split_disconnected: bool = False
    """One segment per 4-connected piece (:func:`ldmseg.postprocess.postprocess`): for data whose
    segments are connected (the synthetic scenes), not COCO, where occlusion splits objects."""
    num_samples: int = 1
    """Samples drawn per image (seeds ``seed`` … ``seed + K - 1``); K ≥ 2: one map made of them
    (``fusion``), with a per-pixel uncertainty and a stability per segment. K times the sampling time
    (docs/method.md, "Several samples")."""
    fusion: Literal["vote", "medoid"] = "vote"
    """How K ≥ 2 samples make one map: ``vote``, segments matched across the samples, each pixel to
    the one most samples put it in (:func:`ldmseg.agreement.consensus_map`); ``medoid``, the sample
    agreeing most with the others (:func:`ldmseg.agreement.choose_medoid`)."""
    batch_size: int = 16
    autocast: Literal["no", "fp16", "bf16", "auto"] = "no"
    """The denoiser's dtype while sampling (the sampler's arithmetic and the AE decoder stay float32);
    ``auto``: bf16 or fp16 on CUDA, float32 elsewhere (:func:`ldmseg.precision.resolve_precision`)."""

    def validate(self) -> None:
        for name in ("steps", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sampling.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def thresholds(self) -> dict[str, float]:
        """``{"mask_th": …, "count_th": …, "overlap_th": …}``: the post-processing keywords."""
        return {k: getattr(self, k) for k in self.THRESHOLDS}

    @property
    def postprocess_options(self) -> dict:
        """The :func:`ldmseg.postprocess.postprocess` keywords: the thresholds and ``split_disconnected``."""
        return {**self.thresholds, "split_disconnected": self.split_disconnected}


@dataclass
class PreprocessConfig:
    """Ray Data preprocessing into Parquet shards."""

    rows_per_file: int = 256
    """Rows per Parquet file, and images per Ray task (each task writes one file), whatever the
    cluster's CPU count: only the last file of a split in a chunk is smaller, and rejected images
    leave a file short. A chunk of fewer files than CPUs leaves CPUs idle (raise ``chunk_rows``)."""
    chunk_rows: int = 2048
    """Images processed per resumable chunk; a finished chunk is never redone."""
    val_fraction: float = 0.0
    """Fraction of images put in the ``val`` split (deterministic by image id); 0: all in ``split``."""
    image_format: Literal["png", "jpeg", "raw"] = "raw"


@dataclass
class TrackingConfig:
    """MLflow tracking; ``None`` URI means the embedded sqlite store in the run folder."""

    tracking_uri: Optional[str] = None
    experiment: str = "ldmseg"


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    mask_ae: MaskAEConfig = field(default_factory=MaskAEConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train_ae: TrainConfig = field(default_factory=TrainConfig)
    train_ldm: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> None:
        self.data.validate()
        self.mask_ae.validate()
        if self.mask_ae.train_crop is not None and self.mask_ae.train_crop > self.data.resolution:
            raise ConfigError(f"mask_ae.train_crop {self.mask_ae.train_crop} exceeds data.resolution "
                              f"{self.data.resolution}: use a smaller crop, or null for whole maps")
        self.diffusion.validate()
        for key, t in (("train_ae", self.train_ae), ("train_ldm", self.train_ldm)):
            for name, value in (("max_nonfinite_steps", t.max_nonfinite_steps), ("num_workers", t.num_workers)):
                if value < 1:
                    raise ConfigError(f"{key}.{name} must be >= 1, got {value}")
            if t.batch_size % t.num_workers:  # the global batch is split evenly over the workers
                raise ConfigError(f"{key}.batch_size {t.batch_size}: not a multiple of num_workers {t.num_workers}")
        self.sampling.validate()
        self.segment.validate()
        self.serve.validate()


# ---- Loading -------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train_ae.lr=1e-3", "data.num_slots=8"]`` → ``{"train_ae.lr": 0.001, "data.num_slots": 8}``.

    Values are parsed as YAML (``3e-4`` as a float too); the keys are checked by :func:`override`.
    """
    flat: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train_ae.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({reason}); close its brackets or "
                              "quote it, e.g. mask_ae.widths=[16,32] or name='a: b'") from exc
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        flat[key.strip()] = value
    return flat


def override(cfg: Config | Mapping[str, Any], assignments: Mapping[str, Any]) -> Config:
    """A new validated :class:`Config`: ``cfg`` with dotted keys set, e.g. ``{"train_ldm.lr": 1e-4}``.

    The one override path (CLI ``key=value`` words, Tune search spaces, synth flags, sampling options).
    ``cfg`` may be a Config or its nested dict. The dataclass fields are the only whitelist: an
    unknown key fails naming the valid keys of its section.
    """
    base = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return from_dict(merge(base, nest(assignments)))


def with_sampling(cfg: Config, options: Mapping[str, Any]) -> Config:
    """``cfg`` with sampling options set: ``{"steps": 10}`` sets ``sampling.steps`` (``None`` values
    are skipped). The :class:`SamplingConfig` fields are the only accepted names (:func:`override`)."""
    return override(cfg, {f"sampling.{k}": v for k, v in options.items() if v is not None})


def sampling_fields() -> tuple[str, ...]:
    """The names of the :class:`SamplingConfig` fields: the sampling vocabulary."""
    return tuple(f.name for f in dataclasses.fields(SamplingConfig))


def from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict."""
    cfg = build(Config, values or {})
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML, or a shipped config's name: :func:`~ldmseg.config_files.find_config`; ``None``: defaults),
    apply ``key=value`` overrides, validate."""
    values: dict = {}
    if path is not None:
        path = find_config(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return override(values, parse_overrides(overrides or []))
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


HASH_NEUTRAL_KEYS = ("placement_strategy", "max_nonfinite_steps", "checkpoint_dir", "ema_on_cpu")
"""Config keys left out of :func:`config_hash` (added later and result-neutral: old runs keep their names)."""


def config_hash(cfg: Any, sections: list[str] | None = None) -> str:
    """Short stable hash of the config (or of some of its sections), for run names."""
    d = to_dict(cfg)
    if sections is not None:
        d = {k: d[k] for k in sections}
    for section in d.values():  # where workers run changes no result: not part of a run's identity
        if isinstance(section, dict):
            for key in HASH_NEUTRAL_KEYS:
                section.pop(key, None)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]
