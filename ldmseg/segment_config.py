"""Settings of batch segmentation (``ldmseg segment``): the ``segment`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from ldmseg.typed import ConfigError


@dataclass
class SegmentConfig:
    """How ``ldmseg segment`` spreads work over Ray Data (docs/segment.md)."""

    batch_size: int = 16
    """Images per call of a model actor (its samples are drawn ``sampling.batch_size`` at a time)."""
    decode_batch_size: int = 32
    """Images per CPU decode task (read, decode, resize)."""
    decode_cpus: float = 0.5
    """CPUs per decode task. Unlike ``num_cpus`` it keeps decoding in tasks of their own; equal
    values let Ray Data fuse decoding into the model actors."""
    write_batch_size: int = 64
    """Images per CPU write task; each writes one part of the JSON (``panoptic.parts/``)."""
    min_actors: int = 1
    """Model actors kept up (each loads the model once)."""
    max_actors: int = 1
    """Model actors at most (Ray Data scales between the two)."""
    num_gpus: float = 0.0
    """GPUs per model actor (1 on GPU clusters; the device is the one Ray assigns)."""
    num_cpus: float = 1.0
    """CPUs per model actor (its torch threads); on 2 cores keep 1 so decoding can run."""
    max_pixels: int = 40_000_000
    """Larger images are quarantined before decoding (decompression bombs): raise it for huge scans."""
    overlay_alpha: float = 0.55
    """Opacity of the segment colours in ``--overlays`` JPEGs."""
    overlay_quality: int = 90
    """JPEG quality of the overlays."""

    def validate(self) -> None:
        for name in ("batch_size", "decode_batch_size", "write_batch_size", "min_actors", "max_actors", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"segment.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_actors < self.min_actors:
            raise ConfigError(f"segment.max_actors ({self.max_actors}) must be >= segment.min_actors "
                              f"({self.min_actors})")
        if self.num_gpus < 0 or self.num_cpus <= 0 or self.decode_cpus <= 0:
            raise ConfigError(f"segment.num_gpus must be >= 0, segment.num_cpus and segment.decode_cpus > 0, got "
                              f"{self.num_gpus}, {self.num_cpus}, {self.decode_cpus}")
        if not 0.0 <= self.overlay_alpha <= 1.0 or not 1 <= self.overlay_quality <= 100:
            raise ConfigError("segment.overlay_alpha must be in [0, 1] and segment.overlay_quality in [1, 100]")
