"""Sampling uncertainty: how far several samples of one image agree (docs/method.md#sampling).

A diffusion segmenter draws a map per seed; where the seeds disagree, the model is unsure. Two id
maps agree on a segment when the segments overlap with IoU > 0.5 (COCO's matching rule, so each
segment has at most one match). From K samples of an image:

- :func:`choose_medoid` picks the sample agreeing most with the others and gives the per-pixel
  disagreement (the fraction of the other samples that disagree with it at that pixel);
- :func:`segment_stability` gives each segment of a map the fraction of the K samples that
  reproduce it (the map itself included, so 1/K ≤ stability ≤ 1);
- :func:`consensus_map` votes one map: segments matched across the samples form groups, and each
  pixel goes to the group (of those held by enough samples) or void that most samples put it in.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def segment_matches(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Ka, Kb) bool over the ids 0..max of two (H, W) id maps (0 = void): segment i of ``a`` and
    segment j of ``b`` overlap with IoU > 0.5; row and column 0 (void) match only each other."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ka, kb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
    inter = np.bincount((a * kb + b).ravel(), minlength=ka * kb).reshape(ka, kb)
    union = inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter
    match = inter > 0.5 * np.maximum(union, 1)
    match[0, :] = False
    match[:, 0] = False
    match[0, 0] = True
    return match


def segment_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W) bool: where two id maps (0 = void, ids ≥ 0) agree.

    A pixel agrees when both maps are void there, or when the two segments covering it overlap
    with IoU > 0.5 (so each segment has at most one match).
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    return segment_matches(a, b)[a, b]


def choose_medoid(maps: Sequence[np.ndarray]) -> tuple[int, np.ndarray]:
    """Index of the map agreeing most with the others (ties: first) and its (H, W) float32 uncertainty."""
    n = len(maps)
    if n == 1:
        return 0, np.zeros(maps[0].shape, dtype=np.float32)
    agree = {}
    scores = np.zeros(n)
    for i in range(n):
        for j in range(i + 1, n):
            agree[i, j] = agree[j, i] = segment_agreement(maps[i], maps[j])
            m = agree[i, j].mean()
            scores[i] += m
            scores[j] += m
    best = int(np.argmax(scores))
    agreeing = sum(agree[best, j].astype(np.float32) for j in range(n) if j != best)
    return best, (1.0 - agreeing / (n - 1)).astype(np.float32)


def segment_stability(id_map: np.ndarray, samples: Sequence[np.ndarray]) -> dict[int, float]:
    """Segment id of ``id_map`` → the fraction of ``samples`` ((H, W) id maps, ``id_map`` itself
    usually among them) holding a segment that matches it at IoU > 0.5."""
    ids = [int(i) for i in np.unique(np.asarray(id_map)) if i != 0]
    if not samples:
        raise ValueError("segment_stability needs at least one sample")
    hits = dict.fromkeys(ids, 0)
    for sample in samples:
        found = segment_matches(id_map, sample)[:, 1:].any(axis=1)
        for i in ids:
            hits[i] += int(found[i])
    return {i: hits[i] / len(samples) for i in ids}


VOTE_MIN_SUPPORT = 0.2
"""The vote's segment groups must be held by more than this fraction of the samples: chosen on the
128 validation scenes with two bench models (docs/benchmarks.md, "Vote of several samples"),
where 0.1–0.3 scored within 1 PQ point and a majority (0.5) 6–12 points less."""


def consensus_map(maps: Sequence[np.ndarray], min_support: float = VOTE_MIN_SUPPORT
                  ) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """One id map voted by K (H, W) id maps of one image (0 = void).

    The segments of the medoid (:func:`choose_medoid`), then of the other samples in order, are
    grouped: a segment joins the first group whose first segment it overlaps with IoU > 0.5 and
    that holds no segment of its sample yet, else it starts a group. Groups held by more than
    ``min_support`` of the samples are kept; each pixel goes to the kept group (or void) that
    most samples put it in (ties: void, then the group found first). A segment the medoid merged
    but most samples split comes out split, and the reverse; a segment only some samples find
    survives where the samples that miss it disagree among themselves.

    Returns ``id_map`` (H, W) int64 (segments 1..N in group order); ``segments``, one dict per
    segment in id order, ``{"id", "area" (pixels), "score" (one minus its mean uncertainty),
    "stability" (the fraction of samples holding its group)}``; and the (H, W) float32
    ``uncertainty``: the fraction of samples that do not put the pixel where the vote did.
    """
    maps = [np.asarray(m, dtype=np.int64) for m in maps]
    k = len(maps)
    if k == 0:
        raise ValueError("consensus_map needs at least one map")
    best, _ = choose_medoid(maps)
    heads: list[np.ndarray] = []          # per group: its first segment's (H, W) bool mask
    head_areas: list[int] = []
    members: list[dict[int, int]] = []    # per group: sample index -> segment id
    for i in [best] + [j for j in range(k) if j != best]:
        ids, areas = np.unique(maps[i], return_counts=True)
        size = int(ids[-1]) + 1
        # each earlier group's overlap with every segment of this sample, one pass per group
        inters = [np.bincount(maps[i][head], minlength=size) for head in heads]
        for sid, area in zip(ids.tolist(), areas.tolist()):
            if sid == 0:
                continue
            for g, inter in enumerate(inters):
                if i not in members[g] and inter[sid] > 0.5 * (head_areas[g] + area - inter[sid]):
                    members[g][i] = sid
                    break
            else:
                heads.append(maps[i] == sid)
                head_areas.append(area)
                members.append({i: sid})
    kept = [group for group in members if len(group) > min_support * k]
    # votes[n] counts the samples putting a pixel in kept group n (0: void); a pixel of a dropped
    # group votes in the spare last row, which is never read
    flat = [m.ravel() for m in maps]
    votes = np.zeros((len(kept) + 2, flat[0].size), dtype=np.int32)
    pixels = np.arange(flat[0].size)
    for i, m in enumerate(flat):
        to_row = np.full(int(m.max()) + 1, len(kept) + 1, dtype=np.int64)
        to_row[0] = 0
        for n, group in enumerate(kept, start=1):
            if i in group:
                to_row[group[i]] = n
        votes[to_row[m], pixels] += 1
    votes = votes[:-1].reshape((len(kept) + 1,) + maps[0].shape)
    winner = votes.argmax(axis=0)
    uncertainty = (1.0 - np.take_along_axis(votes, winner[None], axis=0)[0] / k).astype(np.float32)
    present = [n for n in range(1, len(kept) + 1) if (winner == n).any()]
    relabel = np.zeros(len(kept) + 1, dtype=np.int64)
    relabel[present] = np.arange(1, len(present) + 1)
    id_map = relabel[winner]
    areas = np.bincount(id_map.ravel(), minlength=len(present) + 1)
    certain = np.bincount(id_map.ravel(), weights=1.0 - uncertainty.ravel(), minlength=len(present) + 1)
    segments = [{"id": new, "area": int(areas[new]), "score": float(certain[new] / areas[new]),
                 "stability": len(kept[n - 1]) / k}
                for new, n in enumerate(present, start=1)]
    return id_map, segments, uncertainty
