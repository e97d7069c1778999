"""Known-masks for inpainting: coverage, seeding, edge fractions, block structure, upsampling."""

from __future__ import annotations

import numpy as np
import pytest

from ldmseg.data.masks import global_mask, make_known_mask, sparse_mask, upsample_mask

FRACTIONS = [0.1, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("kind", ["sparse", "global"])
@pytest.mark.parametrize("h,w", [(16, 16), (8, 13), (64, 64)])
def test_edge_fractions_are_exact(kind, h, w):
    for seed in range(5):
        none = make_known_mask(kind, h, w, 0.0, seed, block=2)
        full = make_known_mask(kind, h, w, 1.0, seed, block=2)
        assert none.shape == full.shape == (h, w)
        assert none.dtype == full.dtype == bool
        assert not none.any() and full.all()


@pytest.mark.parametrize("block", [1, 2, 4])
def test_sparse_fraction_on_average(block):
    for p in FRACTIONS:
        rng = np.random.default_rng(int(p * 100) + block)
        means = [sparse_mask(16, 16, p, block=block, generator=rng).mean() for _ in range(200)]
        # 200 masks of 256/block² independent blocks: the standard error is below 0.01
        assert abs(np.mean(means) - p) < 0.03


def test_sparse_blocks_are_constant():
    m = sparse_mask(18, 13, 0.5, block=4, generator=np.random.default_rng(0))
    assert m.shape == (18, 13)
    for i in range(0, 18, 4):
        for j in range(0, 13, 4):
            blk = m[i:i + 4, j:j + 4]
            assert blk.all() or not blk.any()
    assert 0 < m.mean() < 1


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20), (64, 64)])
def test_global_fraction_is_met(h, w):
    for p in FRACTIONS + [0.01, 0.99]:
        for seed in range(10):
            m = global_mask(h, w, p, seed)
            covered = m.sum()
            assert covered >= p * h * w - 1e-9      # at least the target ...
            assert covered <= p * h * w + 1         # ... up to rounding to whole cells


def boundary_length(m: np.ndarray) -> int:
    """Number of 4-neighbour cell pairs that differ (the mask's perimeter inside the grid)."""
    return int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())


def test_global_mask_is_made_of_large_blocks():
    # a union of a few large rectangles has a short boundary; a sparse mask of the same
    # fraction (each cell independent) has ~2·2·32·31·p·(1-p) ≈ 744 differing pairs
    glob = [boundary_length(global_mask(32, 32, 0.25, seed)) for seed in range(20)]
    sparse = [boundary_length(sparse_mask(32, 32, 0.25, generator=seed)) for seed in range(20)]
    assert abs(np.mean(sparse) - 2 * 2 * 32 * 31 * 0.25 * 0.75) < 60
    assert np.median(glob) < np.median(sparse) / 3
    # a single cell's worth of target gives one cell: the smallest possible rectangle
    assert global_mask(32, 32, 1 / 1024, 0).sum() == 1


@pytest.mark.parametrize("kind", ["sparse", "global"])
def test_seeded_reproducibility(kind):
    a = make_known_mask(kind, 16, 16, 0.5, 7, block=2)
    b = make_known_mask(kind, 16, 16, 0.5, 7, block=2)
    c = make_known_mask(kind, 16, 16, 0.5, 8, block=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # a generator works too and advances between calls
    rng = np.random.default_rng(7)
    first = make_known_mask(kind, 16, 16, 0.5, rng, block=2)
    second = make_known_mask(kind, 16, 16, 0.5, rng, block=2)
    np.testing.assert_array_equal(first, a)
    assert (first != second).any()


def test_upsample_mask():
    m = np.array([[True, False], [False, True]])
    up = upsample_mask(m, 3)
    assert up.shape == (6, 6) and up.dtype == bool
    assert up[:3, :3].all() and not up[:3, 3:].any() and not up[3:, :3].any() and up[3:, 3:].all()
    assert up.mean() == m.mean()
    batched = upsample_mask(np.stack([m, ~m]), 2)
    assert batched.shape == (2, 4, 4)
    np.testing.assert_array_equal(batched[1], ~upsample_mask(m, 2))
    np.testing.assert_array_equal(upsample_mask(m, 1), m)


def test_bad_arguments_explain_themselves():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sparse_mask(4, 4, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        global_mask(4, 4, -0.1)
    with pytest.raises(ValueError, match="'sparse' or 'global'"):
        make_known_mask("box", 4, 4, 0.5, 0)
    with pytest.raises(ValueError, match="block"):
        sparse_mask(4, 4, 0.5, block=0)
    with pytest.raises(TypeError, match="seed"):
        make_known_mask("sparse", 4, 4, 0.5, "seven")
    with pytest.raises(ValueError, match="factor"):
        upsample_mask(np.ones((2, 2), bool), 0)
