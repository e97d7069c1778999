"""Seeded synthetic scenes written as an exact COCO panoptic folder (``ldmseg synth``).

Each scene has 1–``max_stuff`` stuff regions (wavy bands splitting the background, one segment
per stuff category, ``isthing=0``) and ``min_things``–``max_things`` thing shapes (circle,
rectangle, triangle, ellipse: one category each, ``isthing=1``). Later shapes occlude earlier
ones. Some things reuse an earlier thing's colour, so instances must be told apart by shape,
overlap and position, not colour. Thin void outlines around some things bring the void fraction
near ``void_fraction`` (drawn dark in the photo), and with probability ``crowd_prob`` one crowd
segment (a cluster of small shapes sharing one id, ``iscrowd=1``) is added.

``segments_info`` (area, bbox) is computed from the final id map, so it is exact. Segment ids are
random in [1, 2²⁴), unique per image. Image ``i`` depends only on ``(seed, i)``: growing
``num_images`` keeps earlier images byte-identical, and the same arguments give byte-identical
files (JPEG quality 95, as COCO's photos).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from ldmseg.config import SynthConfig
from ldmseg.data.coco_writer import CocoPanopticWriter
from ldmseg.data.ids import MAX_ID
from ldmseg.data.segments import segments_info

THING_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "rectangle", "supercategory": "shape", "isthing": 1, "color": [0, 130, 200]},
    {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [255, 200, 0]},
    {"id": 4, "name": "ellipse", "supercategory": "shape", "isthing": 1, "color": [120, 60, 180]},
]
STUFF_CATEGORIES = [
    {"id": 101, "name": "sky", "supercategory": "background", "isthing": 0, "color": [110, 170, 230]},
    {"id": 102, "name": "grass", "supercategory": "background", "isthing": 0, "color": [70, 150, 60]},
    {"id": 103, "name": "sand", "supercategory": "background", "isthing": 0, "color": [210, 190, 130]},
    {"id": 104, "name": "water", "supercategory": "background", "isthing": 0, "color": [30, 80, 140]},
    {"id": 105, "name": "wall", "supercategory": "background", "isthing": 0, "color": [150, 140, 135]},
]
CATEGORIES = THING_CATEGORIES + STUFF_CATEGORIES
JPEG_QUALITY = 95


@dataclass
class Scene:
    """One synthetic image: ``image`` (H, W, 3) uint8 RGB, ``id_map`` (H, W) int64 (0 = void),
    ``segments_info`` (id, category_id, iscrowd, area, bbox [x, y, w, h]) in paint order."""

    image: np.ndarray
    id_map: np.ndarray
    segments_info: list[dict]


@dataclass
class SynthSummary:
    """What :func:`write_scenes` wrote."""

    out: str
    num_images: int
    width: int
    height: int
    num_segments: int
    num_things: int
    num_stuff: int
    num_crowd: int
    void_fraction: float
    """Fraction of void pixels over all images."""

    def line(self) -> str:
        return (f"wrote {self.num_images} images ({self.width}x{self.height}) with {self.num_segments} segments "
                f"({self.num_things} things, {self.num_stuff} stuff, {self.num_crowd} crowd; "
                f"{100 * self.void_fraction:.1f}% void pixels) to {self.out}")


def make_config(num_images: int, size: int = 64, seed: int = 0, **knobs) -> SynthConfig:
    """A checked :class:`SynthConfig`; ``knobs`` are its other fields (``height``, ``max_things``...)."""
    names = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise TypeError(f"unknown synthetic-scene knob {unknown[0]!r}; valid: {', '.join(sorted(names))}")
    cfg = SynthConfig(num_images=num_images, size=size, seed=seed, **knobs)
    check_config(cfg)
    return cfg


def check_config(cfg: SynthConfig) -> None:
    """Raise ``ValueError`` saying how to fix an out-of-range knob."""
    height = cfg.height if cfg.height is not None else cfg.size
    if cfg.num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {cfg.num_images}")
    if min(cfg.size, height) < 8:
        raise ValueError(f"images must be at least 8x8 pixels, got {cfg.size}x{height}")
    if not 0 <= cfg.min_things <= cfg.max_things:
        raise ValueError(f"need 0 <= min_things <= max_things, got {cfg.min_things} and {cfg.max_things}")
    if not 1 <= cfg.max_stuff <= len(STUFF_CATEGORIES):
        raise ValueError(f"max_stuff must lie in [1, {len(STUFF_CATEGORIES)}], got {cfg.max_stuff}")
    if not 0.0 <= cfg.void_fraction < 0.5:
        raise ValueError(f"void_fraction must lie in [0, 0.5), got {cfg.void_fraction}")
    for name in ("crowd_prob", "shared_colour_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {getattr(cfg, name)}")


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _shape_mask(kind: str, rng: np.random.Generator, shape: tuple[int, int],
                cy: float, cx: float, r: float) -> np.ndarray:
    """(H, W) bool mask of one shape of radius ~``r`` centred at (cy, cx), randomly rotated.

    Pixel (y, x) is inside if its centre (y + 0.5, x + 0.5) is; only the window around the
    centre is computed.
    """
    angle = rng.uniform(0, np.pi)
    mask = np.zeros(shape, dtype=bool)
    y0, y1 = max(0, int(cy - r) - 1), min(shape[0], int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r) - 1), min(shape[1], int(cx + r) + 2)
    if y0 >= y1 or x0 >= x1:
        return mask
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif kind == "ellipse":
        a, b = r, r * rng.uniform(0.35, 0.7)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    elif kind == "rectangle":
        a, b = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.35, 0.9)
        inside = (np.abs(u) <= a) & (np.abs(v) <= b)
    elif kind == "triangle":
        corners = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        py, px = r * np.sin(corners), r * np.cos(corners)
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for k in range(3):  # corners in increasing angle: inside is on the same side of every edge
            j = (k + 1) % 3
            inside &= (px[j] - px[k]) * (dy - py[k]) - (py[j] - py[k]) * (dx - px[k]) >= 0
    else:
        raise ValueError(f"unknown shape {kind!r}")
    mask[y0:y1, x0:x1] = inside
    return mask


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation of an (H, W) bool mask, ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _distinct_colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A colour far from those in ``avoid`` (best of a few seeded draws)."""
    best, best_dist = None, -1.0
    for _ in range(8):
        colour = rng.uniform(15, 240, 3)
        dist = min((np.abs(colour - a).sum() for a in avoid), default=999.0)
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def _segment_ids(rng: np.random.Generator, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        candidate = int(rng.integers(1, MAX_ID + 1))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _stuff(rng, cfg: SynthConfig, yy, xx, image, id_map, seg_ids, order):
    """Split the background into wavy bands, one stuff category each; returns their colours."""
    height, width = id_map.shape
    n = int(rng.integers(1, cfg.max_stuff + 1))
    cats = rng.choice(len(STUFF_CATEGORIES), size=n, replace=False)
    theta = rng.uniform(0, 2 * np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    wave = rng.uniform(0.02, 0.08) * max(height, width) * np.sin(
        2 * np.pi * across / (rng.uniform(0.5, 1.5) * max(height, width)) + rng.uniform(0, 2 * np.pi))
    proj = along + wave
    proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    cuts = (np.arange(1, n) + rng.uniform(-0.3, 0.3, n - 1)) / n
    band = np.searchsorted(cuts, proj)
    colours = []
    for k, cat in enumerate(cats):
        category = STUFF_CATEGORIES[int(cat)]
        region = band == k
        colour = np.asarray(category["color"], dtype=np.float64) + rng.uniform(-25, 25, 3)
        phi, freq = rng.uniform(0, np.pi), (2 + int(cat)) * 2 * np.pi / max(height, width) * 3
        texture = 12.0 * np.sin(freq * (xx[region] * np.cos(phi) + yy[region] * np.sin(phi)) + rng.uniform(0, 2 * np.pi))
        image[region] = colour + texture[:, None]
        seg_id = seg_ids.pop()
        id_map[region] = seg_id
        order.append((seg_id, category["id"], 0))
        colours.append(colour)
    return colours


def render_scene(cfg: SynthConfig, index: int) -> Scene:
    """Scene ``index`` of the dataset ``cfg`` describes; depends only on (cfg knobs, seed, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    width = cfg.size
    height = cfg.height if cfg.height is not None else cfg.size
    short = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + np.float32(0.5)
    image = np.zeros((height, width, 3), dtype=np.float32)
    id_map = np.zeros((height, width), dtype=np.int64)

    num_things = int(rng.integers(cfg.min_things, cfg.max_things + 1))
    has_crowd = bool(rng.random() < cfg.crowd_prob)
    seg_ids = _segment_ids(rng, cfg.max_stuff + num_things + 1)
    order: list[tuple[int, int, int]] = []  # (segment id, category id, iscrowd) in paint order
    stuff_colours = _stuff(rng, cfg, yy, xx, image, id_map, seg_ids, order)

    crowd_at = int(rng.integers(0, num_things + 1)) if has_crowd else -1
    thing_colours: list[np.ndarray] = []
    outlined: list[int] = []
    for k in range(num_things + (1 if has_crowd else 0)):
        is_crowd = k == crowd_at
        cat = int(rng.integers(0, len(THING_CATEGORIES)))
        kind = THING_CATEGORIES[cat]["name"]
        if thing_colours and rng.random() < cfg.shared_colour_prob:
            colour = thing_colours[int(rng.integers(0, len(thing_colours)))]
        else:
            colour = _distinct_colour(rng, stuff_colours + thing_colours)
        thing_colours.append(colour)
        if is_crowd:  # a cluster of small shapes of one category sharing one segment
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            mask = np.zeros((height, width), dtype=bool)
            for _ in range(int(rng.integers(3, 7))):
                r = max(1.5, rng.uniform(0.04, 0.08) * short)
                oy, ox = rng.normal(0, 0.1 * short, 2)
                mask |= _shape_mask(kind, rng, (height, width), cy + oy, cx + ox, r)
        else:
            r = max(2.0, rng.uniform(0.07, 0.2) * short)
            mask = _shape_mask(kind, rng, (height, width), rng.uniform(0, height), rng.uniform(0, width), r)
        gy, gx = rng.uniform(-12, 12, 2) / short
        shade = gy * (yy[mask] - height / 2) + gx * (xx[mask] - width / 2)
        image[mask] = colour + shade[:, None]
        seg_id = seg_ids.pop()
        id_map[mask] = seg_id
        order.append((seg_id, THING_CATEGORIES[cat]["id"], int(is_crowd)))
        outlined.append(seg_id)

    # Thin void outlines around things, in random order, until the void target is reached.
    thickness = max(1, round(short / 160))
    target = cfg.void_fraction * height * width
    void = np.zeros((height, width), dtype=bool)
    for seg_id in rng.permutation(outlined).tolist():
        if void.sum() >= target:
            break
        visible = id_map == seg_id
        if visible.any():
            void |= _dilate(visible, thickness) & ~visible
    id_map[void] = 0
    image[void] *= 0.45

    image += np.float32(4.0) * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(image=image, id_map=id_map, segments_info=segments_info(
        id_map, [sid for sid, _, _ in order], category_id={sid: cat for sid, cat, _ in order},
        iscrowd={sid: crowd for sid, _, crowd in order}))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_scenes(out: str | os.PathLike, num_images: int, size: int = 64, seed: int = 0,
                 **knobs) -> SynthSummary:
    """Write ``num_images`` scenes to ``out`` (local path or fsspec URL) as a COCO panoptic folder.

    ``out/images/*.jpg``, ``out/panoptic/*.png``, ``out/panoptic.json``; image ids 1..N, file
    names ``{id:012d}.jpg`` / ``.png``. ``size`` is the width (and height unless ``height=`` is
    given); ``knobs`` are the other :class:`~ldmseg.config.SynthConfig` fields.
    """
    cfg = make_config(num_images, size, seed, **knobs)
    return write_scenes_from_config(out, cfg)


def write_scenes_from_config(out: str | os.PathLike, cfg: SynthConfig) -> SynthSummary:
    """:func:`write_scenes` with every knob taken from ``cfg``."""
    check_config(cfg)
    out = os.fspath(out)
    width = cfg.size
    height = cfg.height if cfg.height is not None else cfg.size
    info = {"description": "ldmseg synthetic scenes", "version": "1", "config": dataclasses.asdict(cfg)}
    writer = CocoPanopticWriter(out, CATEGORIES, info=info, images=True, jpeg_quality=JPEG_QUALITY)
    counts = {"segments": 0, "things": 0, "stuff": 0, "crowd": 0, "void": 0}
    thing_ids = {c["id"] for c in THING_CATEGORIES}
    for index in range(cfg.num_images):
        scene = render_scene(cfg, index)
        image_id = index + 1
        writer.add_image(image_id, f"{image_id:012d}.jpg", height, width, image=scene.image)
        writer.add_annotation(image_id, f"{image_id:012d}.png", scene.id_map, scene.segments_info)
        counts["segments"] += len(scene.segments_info)
        counts["things"] += sum(s["category_id"] in thing_ids for s in scene.segments_info)
        counts["crowd"] += sum(s["iscrowd"] for s in scene.segments_info)
        counts["void"] += int((scene.id_map == 0).sum())
    counts["stuff"] = counts["segments"] - counts["things"]
    writer.close()
    pixels = max(1, cfg.num_images * height * width)
    return SynthSummary(out=out, num_images=cfg.num_images, width=width, height=height,
                        num_segments=counts["segments"], num_things=counts["things"], num_stuff=counts["stuff"],
                        num_crowd=counts["crowd"], void_fraction=counts["void"] / pixels)
