"""Training batches of synthetic scenes, built the way preprocessing builds them (clean, resize, remap)."""

from __future__ import annotations

import numpy as np
import torch

from ldmseg.data.encoding import image_to_tensor
from ldmseg.data.resize import resize_pad
from ldmseg.data.slots import clean_segments, remap_ids
from ldmseg.data.synthetic import make_config, render_scene


def scene_batch(cfg, n: int, seed: int = 3, slot_seed: int | None = None) -> dict:
    """A batch of ``n`` synthetic scenes (seed ``seed``) at the config's resolution: ``image
    (n,3,R,R) float32``, ``slot_map (n,R,R) int64``, ``valid (n,R,R) bool``; slots drawn with
    ``slot_seed`` (default: ``seed``)."""
    synth = make_config(n, size=cfg.data.resolution, seed=seed, max_things=4)
    rng = np.random.default_rng(seed if slot_seed is None else slot_seed)
    images, slots, valids = [], [], []
    for i in range(n):
        scene = render_scene(synth, i)
        clean = clean_segments(scene.id_map, scene.segments_info, cfg.data.min_segment_area)
        image_r, ids_r, valid, _ = resize_pad(scene.image, clean.id_map, cfg.data.resolution)
        images.append(image_r)
        slots.append(remap_ids(ids_r, cfg.data.num_slots, rng).slot_map)
        valids.append(valid)
    return {"image": image_to_tensor(np.stack(images)), "slot_map": torch.from_numpy(np.stack(slots)),
            "valid": torch.from_numpy(np.stack(valids))}
