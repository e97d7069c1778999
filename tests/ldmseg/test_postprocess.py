"""Post-processing of logits into segments, and the agreement of several samples (medoid, uncertainty)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmseg.postprocess import postprocess
from ldmseg.agreement import consensus_map
from ldmseg.segmenter import choose_medoid, segment_agreement


def test_postprocess_thresholds_on_hand_made_logits():
    s, h, w = 5, 10, 10
    logits = torch.full((s, h, w), -8.0)
    logits[0] = 0.0  # void slot
    logits[1, :, :5] = 8.0  # left half: 50 px
    logits[2, :5, 5:] = 6.0  # top right: 25 px, 23 after slot 3 takes two
    logits[3, 0, 8:] = 9.0  # 2 px: below count_th (5 px)
    logits[4, 5:, :] = 7.5  # a 50-px sigmoid mask, but slot 1 (8.0) owns its left half: argmax area 25
    ids, segs = postprocess(logits, mask_th=0.5, count_th=0.05, overlap_th=0.6)
    assert [(d["id"], d["slot"], d["area"]) for d in segs] == [(1, 1, 50), (2, 2, 23)]
    assert (ids[:, :5] == 1).all() and (ids[1:5, 5:] == 2).all() and (ids[0, 5:8] == 2).all()
    assert (ids[0, 8:] == 0).all()  # the 2-px segment was dropped
    assert (ids[5:, 5:] == 0).all()  # the mostly hidden segment (25 / 50 < 0.6) was dropped
    prob = logits.softmax(dim=0).max(dim=0).values.numpy()  # a segment's score: mean max-probability
    assert [d["score"] for d in segs] == pytest.approx([float(prob[ids == d["id"]].mean()) for d in segs])
    # a lenient overlap threshold keeps slot 4; ids go by decreasing area
    _, segs = postprocess(logits, mask_th=0.5, count_th=0.05, overlap_th=0.4)
    assert [(d["id"], d["slot"], d["area"]) for d in segs] == [(1, 1, 50), (2, 4, 25), (3, 2, 23)]
    # count_th is a fraction of the valid area
    _, segs = postprocess(logits, mask_th=0.5, count_th=0.0, overlap_th=0.0)
    assert [d["slot"] for d in segs] == [1, 4, 2, 3]


def test_postprocess_mask_th_and_valid():
    logits = torch.zeros(3, 4, 4)
    logits[1, :2] = 3.0  # softmax ≈ 0.91
    logits[2, 2:] = 0.5  # softmax ≈ 0.45 < 0.5 → void
    ids, segs = postprocess(logits, mask_th=0.5, count_th=0.0, overlap_th=0.0)
    assert (ids[:2] == 1).all() and (ids[2:] == 0).all() and len(segs) == 1
    ids, segs = postprocess(logits, mask_th=0.4, count_th=0.0, overlap_th=0.0)
    assert (ids[2:] == 2).all() and len(segs) == 2
    valid = np.ones((4, 4), dtype=bool)
    valid[0] = False
    ids, segs = postprocess(logits.numpy(), mask_th=0.5, count_th=0.0, overlap_th=0.0, valid=valid)
    assert (ids[0] == 0).all() and segs[0]["area"] == 4
    with pytest.raises(ValueError, match="logits must be"):
        postprocess(torch.zeros(4, 4), mask_th=0.5, count_th=0.0, overlap_th=0.5)


def test_agreement_and_medoid():
    a = np.zeros((6, 6), dtype=np.int64)
    a[:, :3], a[:, 3:] = 1, 2
    relabelled = np.where(a == 1, 7, 3)
    assert segment_agreement(a, relabelled).all()
    split = a.copy()
    split[:2, :3] = 5  # one third of segment 1 becomes another segment
    agree = segment_agreement(a, split)
    assert agree[:, 3:].all() and agree[2:, :3].all() and not agree[:2, :3].any()
    other = np.zeros_like(a)
    other[:3], other[3:] = 1, 2  # horizontal halves: IoU 1/3 with every vertical half
    assert not segment_agreement(a, other).any()
    best, uncertainty = choose_medoid([other, a, relabelled, split])
    assert best in (1, 2)  # a and its relabelling agree most with the rest
    assert uncertainty.dtype == np.float32 and uncertainty[3:, 3:].max() == pytest.approx(1 / 3)


def test_the_vote_keeps_what_most_samples_hold():
    halves = np.zeros((6, 8), dtype=np.int64)
    halves[:, :4], halves[:, 4:] = 1, 2
    merged = np.ones_like(halves)           # one segment over both halves: IoU 1/2 with each, no match
    moved = np.where(halves == 1, 9, 4)     # the same halves, other ids
    moved[0, 3] = 0                         # and one void pixel
    ids, segments, uncertainty = consensus_map([merged, halves, merged, moved, halves])
    # the medoid (a halves map) seeds two groups held by 3 of 5 samples; "merged" (2 of 5) is outvoted
    # at every pixel (2 votes against 3)
    assert np.array_equal(ids, halves)
    assert uncertainty.dtype == np.float32
    assert uncertainty[0, 0] == pytest.approx(2 / 5) and uncertainty[0, 3] == pytest.approx(3 / 5)
    assert [(s["id"], s["area"], s["stability"]) for s in segments] == [(1, 24, 3 / 5), (2, 24, 3 / 5)]
    assert segments[0]["score"] == pytest.approx(1 - (23 * 2 / 5 + 3 / 5) / 24)  # one pixel with 2 votes of 5
    assert segments[1]["score"] == pytest.approx(3 / 5)
    # three merged maps of five: one segment
    ids, segments, _ = consensus_map([merged, halves, merged, merged, halves])
    assert (ids == 1).all() and [(s["id"], s["area"], s["stability"]) for s in segments] == [(1, 48, 3 / 5)]
    # void where most samples are void; a segment of one sample in three is dropped
    lone = np.zeros_like(halves)
    lone[:2, :2] = 5
    ids, segments, uncertainty = consensus_map([np.zeros_like(halves), lone, np.zeros_like(halves)])
    assert (ids == 0).all() and segments == [] and uncertainty.max() == pytest.approx(1 / 3)
    # a segment 2 of 5 samples hold, where the other three disagree: kept above min_support 0.4 only
    others = [np.zeros_like(halves) for _ in range(3)]
    others[0][:3, :3], others[1][:, :2] = 6, 7  # IoU 4/9 and 4/12 with the lone segment: no match
    ids, segments, _ = consensus_map([lone, lone, *others])
    assert (ids[:2, :2] == 1).all() and (ids == 1).sum() == 4 and segments[0]["stability"] == 2 / 5
    ids, segments, _ = consensus_map([lone, lone, *others], min_support=0.4)
    assert not (ids[:2, :2] == 1).any() and all(s["stability"] < 2 / 5 for s in segments)
    with pytest.raises(ValueError, match="at least one map"):
        consensus_map([])


def test_split_disconnected_gives_each_piece_its_own_segment():
    """Two separate things on one slot: one segment, or with ``split_disconnected`` one per piece;
    a piece under ``count_th`` stays with the largest piece of its slot."""
    logits = torch.full((3, 8, 8), -10.0)
    slot = torch.zeros(8, 8, dtype=torch.long)
    slot[0:3, 0:3] = 1   # 9 px
    slot[5:8, 4:8] = 1   # 12 px, same slot, not connected
    slot[7, 0] = 1       # 1 px, under count_th
    slot[4, 0:2] = 2     # 2 px of another slot
    logits.scatter_(0, slot[None], 10.0)
    opts = dict(mask_th=0.5, count_th=2 / 64, overlap_th=0.0)
    id_map, segments = postprocess(logits, **opts)
    assert [(s["area"], s["slot"]) for s in segments] == [(22, 1), (2, 2)]
    id_map, segments = postprocess(logits, split_disconnected=True, **opts)
    assert [(s["area"], s["slot"]) for s in segments] == [(13, 1), (9, 1), (2, 2)]
    assert (id_map[5:8, 4:8] == 1).all() and id_map[7, 0] == 1 and (id_map[0:3, 0:3] == 2).all()
    assert (id_map[4, 0:2] == 3).all() and (id_map[slot.numpy() == 0] == 0).all()
