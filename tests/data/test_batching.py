"""ShuffledIndices: deterministic epochs, exact resume, rank split equal to one process."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffcore.data.datasets import DigitsDataset
from diffcore.data.batching import ShuffledIndices
from diffcore.errors import ConfigError


def take(sampler, batches):
    return [sampler.next_batch() for _ in range(batches)]


def test_epochs_are_seeded_permutations():
    s = ShuffledIndices(10, seed=7, batch_size=5)
    stream = sum(take(s, 6), [])
    for epoch in range(3):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert stream[epoch * 10:(epoch + 1) * 10] == expected
    assert stream == sum(take(ShuffledIndices(10, seed=7, batch_size=5), 6), [])
    assert stream != sum(take(ShuffledIndices(10, seed=8, batch_size=5), 6), [])


def test_batches_run_across_epoch_boundaries():
    s = ShuffledIndices(10, seed=0, batch_size=4)
    batches = take(s, 5)  # 20 samples: exactly two epochs
    assert all(len(b) == 4 for b in batches)
    flat = sum(batches, [])
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert s.state_dict() == {"epoch": 2, "position": 0, "n": 10, "seed": 0}


def test_resume_continues_the_same_stream():
    s = ShuffledIndices(13, seed=3, batch_size=4)
    take(s, 5)
    state = s.state_dict()
    assert state == s.state_at(5 * 4)
    expected = take(s, 7)
    resumed = ShuffledIndices(13, seed=3, batch_size=4)
    resumed.load_state_dict(state)
    assert take(resumed, 7) == expected
    it = iter(ShuffledIndices(13, seed=3, batch_size=4))
    assert [next(it) for _ in range(20)] == sum(take(ShuffledIndices(13, seed=3, batch_size=4), 5), [])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), world=st.integers(1, 4), local=st.integers(1, 5), seed=st.integers(0, 99),
       skip=st.integers(0, 7))
def test_rank_shares_make_up_the_single_process_batch(n, world, local, seed, skip):
    single = ShuffledIndices(n, seed, batch_size=world * local)
    ranks = [ShuffledIndices(n, seed, rank=r, world_size=world, batch_size=world * local) for r in range(world)]
    for s in [single, *ranks]:
        s.load_state_dict(single.state_at(skip * world * local))
    for _ in range(4):
        shares = [r.next_batch() for r in ranks]
        assert all(len(share) == local for share in shares)
        assert sum(shares, []) == single.next_batch()
    assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_works_as_a_dataloader_sampler():
    ds = DigitsDataset(split="test")
    sampler = ShuffledIndices(len(ds), seed=1, rank=1, world_size=2, batch_size=8)
    loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=sampler.local_batch_size)
    batch = next(iter(loader))
    expected = ShuffledIndices(len(ds), seed=1, rank=1, world_size=2, batch_size=8).next_batch()
    assert torch.equal(batch["label"], ds.labels[expected]) and batch["image"].shape == (4, 1, 8, 8)


def test_invalid_arguments_and_states():
    with pytest.raises(ConfigError, match="batch size 6 is not divisible by world size 4"):
        ShuffledIndices(10, 0, world_size=4, batch_size=6)
    with pytest.raises(ConfigError, match="rank 2 is outside world size 2"):
        ShuffledIndices(10, 0, rank=2, world_size=2)
    s = ShuffledIndices(10, 0)
    with pytest.raises(ConfigError, match="dataset of 12 with seed 0, this run has 10"):
        s.load_state_dict(ShuffledIndices(12, 0).state_dict())
