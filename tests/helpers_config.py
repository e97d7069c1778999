"""The one tiny test config: conf/tiny.yaml shrunk further so a model builds and steps in well under a second.

32 px images, 8 id slots (3 bit planes), a mask AE of factor 4 (latents 4x8x8), a pixel-unshuffle image
encoder and a one-block-per-level denoiser without attention. Tests add their own settings as
overrides (later overrides win): ``tiny_cfg("sampling.steps=2")``.
"""

from __future__ import annotations

from paths import TINY_YAML

from ldmseg.config import Config, load_config

TINY = (
    "data.resolution=32", "data.num_slots=8", "mask_ae.widths=[8,16,32]", "image_encoder.kind=pixel_unshuffle",
    "denoiser.block_out_channels=[16,32]", "denoiser.layers_per_block=1", "denoiser.attention_levels=[false,false]",
    "denoiser.image_stem_channels=8",
)


def tiny_overrides(*overrides: str) -> list[str]:
    """The tiny config's overrides of conf/tiny.yaml followed by ``overrides`` (for CLIs and sweeps)."""
    return [*TINY, *overrides]


def tiny_cfg(*overrides: str) -> Config:
    """conf/tiny.yaml with the tiny overrides, then ``overrides``."""
    return load_config(TINY_YAML, tiny_overrides(*overrides))


# the tiny config of the evaluation tests: 2 sampling steps, every segment kept, shard files of 8 rows
EVALUATE = ("sampling.steps=2", "sampling.count_th=0.0", "preprocess.rows_per_file=8")
