"""Masks: dense materialisation against hand-built grids; block states consistent with the dense mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfattn import masks
from selfattn.masks import EMPTY, FULL, PARTIAL


def test_causal_is_bottom_right():
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(masks.causal().dense(1, 1, 2, 5)[0, 0], expected)
    assert torch.equal(masks.causal().dense(1, 1, 3, 3)[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


def test_causal_rows_before_the_first_key_see_nothing():
    m = masks.causal().dense(1, 1, 4, 2)[0, 0]  # N_q > N_k: rows 0 and 1 sit at positions -2, -1
    assert torch.equal(m, torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1]], dtype=torch.bool))


def test_sliding_window_keeps_w_recent_positions():
    m = masks.sliding_window(2).dense(1, 1, 4, 4)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_key_padding_and_documents():
    m = masks.key_padding(torch.tensor([2, 3])).dense(2, 1, 1, 4)
    assert m[0, 0, 0].tolist() == [True, True, False, False] and m[1, 0, 0].tolist() == [True, True, True, False]
    d = masks.document(torch.tensor([0, 0, 1, 1, 1])).dense(1, 1, 5, 5)[0, 0]
    assert d[1].tolist() == [True, True, False, False, False] and d[3].tolist() == [False, False, True, True, True]


def test_key_range_hides_keys_outside_each_batch_elements_range():
    m = masks.key_range(torch.tensor([2, 0, 4, 3]), torch.tensor([5, 3, 4, 1])).dense(4, 1, 1, 5)[:, 0, 0]
    assert m.int().tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0] * 5, [0] * 5]  # the last two ranges are empty
    left = masks.key_range(torch.tensor([0, 3, 5])).dense(3, 1, 2, 5)[:, 0]  # no ends: left padding only
    assert left[:, 0].int().tolist() == [[1] * 5, [0, 0, 0, 1, 1], [0] * 5] and torch.equal(left[:, 0], left[:, 1])


def test_and_or_compose():
    a, b = masks.causal(), masks.key_padding(torch.tensor([3]))
    both = (a & b).dense(1, 1, 4, 4)
    either = (a | b).dense(1, 1, 4, 4)
    assert torch.equal(both, a.dense(1, 1, 4, 4) & b.dense(1, 1, 4, 4))
    assert torch.equal(either, a.dense(1, 1, 4, 4) | b.dense(1, 1, 4, 4))


def test_custom_mask_mod_function():
    def every_other(b, h, q, k):
        return (k % 2) == 0

    m = masks.as_mask(every_other).dense(1, 1, 2, 4)[0, 0]
    assert m.tolist() == [[True, False, True, False]] * 2


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_window_validation(bad, err):
    with pytest.raises(err, match="window"):
        masks.sliding_window(bad)


def test_mask_argument_validation():
    with pytest.raises(TypeError, match="integer"):
        masks.key_padding(torch.tensor([1.5]))
    with pytest.raises(ValueError, match=">= 0"):
        masks.key_padding(torch.tensor([-1]))
    with pytest.raises(ValueError, match="shape"):
        masks.document(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"starts\): positions must be >= 0, got \[1, -2\]"):
        masks.key_range(torch.tensor([1, -2]))
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        masks.key_range(torch.tensor([1, 2]), torch.tensor([3, 4, 5]))
    with pytest.raises(TypeError, match="integer"):
        masks.key_range(torch.tensor([0.5]))


def all_masks(B, N_k, g):
    lengths = torch.randint(0, N_k + 1, (B,), generator=g)
    starts, ends = torch.randint(0, N_k + 1, (2, B), generator=g)
    ids = torch.sort(torch.randint(0, 3, (B, N_k), generator=g), dim=-1).values
    w = int(torch.randint(1, N_k + 2, (), generator=g))
    return {
        "causal": masks.causal(),
        "window": masks.sliding_window(w),
        "padding": masks.key_padding(lengths),
        "document": masks.document(ids),
        "doc&causal": masks.document(ids) & masks.causal(),
        "left-padding&causal": masks.key_range(N_k - lengths) & masks.causal(),
        "key-range&window": masks.key_range(starts, ends) & masks.sliding_window(w),
        "window|padding": masks.sliding_window(w) | masks.key_padding(lengths),
        "custom": masks.Mask(lambda b, h, q, k: (q + k + h) % 3 != 0),
    }


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 2), N_q=st.integers(1, 37), N_k=st.integers(1, 37),
       bq=st.integers(1, 9), bk=st.integers(1, 9), seed=st.integers(0, 999))
def test_block_states_never_lie(B, H, N_q, N_k, bq, bk, seed):
    g = torch.Generator().manual_seed(seed)
    for name, m in all_masks(B, N_k, g).items():
        dense = m.dense(B, H, N_q, N_k)
        states = m.block_states(B, H, N_q, N_k, bq, bk).expand(B, H, -1, -1)
        for i in range(states.shape[2]):
            for j in range(states.shape[3]):
                tile = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                s = states[:, :, i, j]
                assert not (tile.flatten(2).any(-1) & (s == EMPTY)).any(), f"{name}: EMPTY block has visible keys"
                assert not ((~tile).flatten(2).any(-1) & (s == FULL)).any(), f"{name}: FULL block has hidden keys"


def test_analytic_block_states_are_exact_for_causal_and_window():
    for m in (masks.causal(), masks.sliding_window(5)):
        states = m.block_states(1, 1, 32, 32, 4, 4)[0, 0]
        dense = m.dense(1, 1, 32, 32)[0, 0].view(8, 4, 8, 4)
        exact = dense.any(-1).any(1).to(torch.int8) + dense.all(-1).all(1).to(torch.int8)
        assert torch.equal(states, exact), f"{m.name}: not exact"
        assert (states == PARTIAL).any() and (states == EMPTY).any()


@pytest.mark.parametrize("seed", range(4))
def test_key_range_block_states_are_exact(seed):
    """The analytic classifier of key_range gives exactly the dense block states (nothing left PARTIAL needlessly),
    at random starts and ends including 0, N_k (no key) and empty ranges, with key blocks shifted by k_pos0."""
    g = torch.Generator().manual_seed(seed)
    B, N_q, N_k = 5, 13, 37
    starts, ends = torch.randint(0, N_k + 1, (2, B), generator=g)
    starts[0], starts[1], ends[2] = 0, N_k, 0
    for m in (masks.key_range(starts, ends), masks.key_range(starts)):
        dense_only = masks.Mask(m.mask_mod)
        for bq, bk, k_pos0 in ((4, 5, 0), (8, 8, 3), (16, 3, 0), (1, 1, 0)):
            got = m.block_states(B, 1, N_q, N_k, bq, bk, k_pos0=k_pos0)
            want = dense_only.block_states(B, 1, N_q, N_k, bq, bk, k_pos0=k_pos0)
            assert torch.equal(got.expand_as(want), want), (m.name, bq, bk, k_pos0, starts.tolist(), ends.tolist())


def test_specs_rebuild_the_same_mask():
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    built = [masks.causal(), masks.sliding_window(3), masks.key_padding(torch.tensor([4, 6])), masks.document(ids),
             masks.document(ids) & masks.causal(), masks.sliding_window(2) | masks.key_padding(torch.tensor([1, 2])),
             masks.from_tensor(torch.rand(6, 6) > 0.5, 6, 6), masks.key_range(torch.tensor([2, 0])),
             masks.causal() & masks.key_range(torch.tensor([1, 6]), torch.tensor([4, 6]))]
    for m in built:
        again = masks.from_spec(m.spec)
        assert torch.equal(again.dense(2, 1, 6, 6), m.dense(2, 1, 6, 6)), m.name
    assert masks.Mask(lambda b, h, q, k: q == k).spec is None
    assert (masks.causal() & masks.Mask(lambda b, h, q, k: q == k)).spec is None
