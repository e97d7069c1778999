"""Pictures of id maps: distinct colours per segment, blended over the image, tiled into a grid.

All arrays are uint8 RGB (H, W, 3); id maps are (H, W) integers with 0 = void.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = 0.6180339887498949


def colorize(id_map: np.ndarray) -> np.ndarray:
    """(H, W) integer ids → (H, W, 3) uint8 colours: 0 (void) black, other ids distinct hues."""
    ids = np.asarray(id_map).astype(np.int64)
    hue = (ids * _GOLDEN) % 1.0
    h6 = hue * 6.0
    sector = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    v, s = 0.95, 0.75
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((*ids.shape, 3), np.float64)
    for k, (r, g, b) in enumerate(table):
        sel = sector == k
        rgb[sel] = np.stack([np.broadcast_to(c, ids.shape)[sel] for c in (r, g, b)], axis=-1)
    rgb[ids == 0] = 0.0
    return (rgb * 255).round().astype(np.uint8)


def blend(image: np.ndarray, id_map: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: ``id_map``'s colours over ``image`` at opacity ``alpha`` (void left as is),
    segment borders drawn in the segment colour at full opacity."""
    image = np.asarray(image, dtype=np.uint8)
    ids = np.asarray(id_map)
    if image.shape[:2] != ids.shape:
        raise ValueError(f"blend needs an image and an id map of one size, got {image.shape[:2]} and {ids.shape}")
    colours = colorize(ids).astype(np.float32)
    out = image.astype(np.float32)
    seg = ids > 0
    out[seg] = (1 - alpha) * out[seg] + alpha * colours[seg]
    border = np.zeros(ids.shape, dtype=bool)
    border[1:, :] |= ids[1:, :] != ids[:-1, :]
    border[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    border &= seg
    out[border] = colours[border]
    return out.round().astype(np.uint8)


def grid(tiles: list[np.ndarray], columns: int = 4, size: int = 160, gap: int = 2) -> np.ndarray:
    """Tiles (any sizes, uint8 RGB) fitted into ``size``×``size`` cells (aspect kept, nearest) on white,
    ``columns`` per row → (rows·(size+gap)−gap, columns·(size+gap)−gap, 3) uint8."""
    from PIL import Image

    if not tiles:
        raise ValueError("grid needs at least one tile")
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    out = np.full((rows * (size + gap) - gap, columns * (size + gap) - gap, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        h, w = tile.shape[:2]
        scale = size / max(h, w)
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
        small = np.asarray(Image.fromarray(tile).resize((tw, th), Image.NEAREST))
        r, c = divmod(k, columns)
        y, x = r * (size + gap), c * (size + gap)
        out[y:y + th, x:x + tw] = small
    return out
