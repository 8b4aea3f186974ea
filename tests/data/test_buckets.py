"""Aspect-ratio buckets and BucketBatches: sizes in bounds, one bucket per batch, rank split equal
to one process, exact resume."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffcore.data.buckets import BucketBatches, cover_size, make_buckets, nearest_bucket
from diffcore.errors import ConfigError


@settings(max_examples=200, deadline=None)
@given(step=st.sampled_from([8, 16, 32, 64]), lo=st.integers(1, 16), span=st.integers(0, 48),
       resolution=st.integers(64, 2048))
def test_buckets_are_in_bounds_multiples_of_the_step_and_about_resolution_squared(step, lo, span, resolution):
    min_side, max_side = lo * step, (lo + span) * step
    buckets = make_buckets(resolution, step, min_side, max_side)
    assert buckets == sorted(set(buckets)) and buckets
    square = min(max_side, max(min_side, resolution // step * step))
    assert (square, square) in buckets
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert min_side <= h <= max_side and min_side <= w <= max_side
        assert (h, w) == (square, square) or h * w <= resolution ** 2
        assert (w, h) in buckets                       # portrait and landscape alike


def test_kohya_like_sizes_at_1024():
    buckets = make_buckets(1024, 64, 256, 2048)
    assert {(1024, 1024), (768, 1344), (1344, 768), (512, 2048), (2048, 512), (832, 1216)} <= set(buckets)
    # the area never drops far below the target: each width takes the tallest height that fits
    assert min(h * w for h, w in buckets) >= 1024 ** 2 - 64 * 2048


def test_nearest_aspect_and_cover():
    buckets = make_buckets(512, 64, 256, 1024)
    assert buckets[nearest_bucket(1000, 1000, buckets)] == (512, 512)
    h, w = buckets[nearest_bucket(300, 600, buckets)]
    assert abs(math.log(w / h) - math.log(2)) < 0.15
    assert cover_size(300, 600, (384, 704)) == (384, 768)
    assert cover_size(1000, 500, (704, 384)) == (768, 384)
    with pytest.raises(ConfigError, match="bucket_resolution_steps"):
        make_buckets(512, 64, 32, 1024)


def _stream(sampler, batches):
    return [sampler.next_batch() for _ in range(batches)]


BUCKETS = [0, 1, 1, 2, 0, 1, 2, 2, 2, 1, 0, 1, 1]   # bucket id of each index


def test_every_batch_is_one_bucket_and_every_index_is_seen_each_epoch():
    s = BucketBatches(BUCKETS, seed=5, batch_size=4)
    assert s.batches_per_epoch == 1 + 2 + 1     # 3, 6, 4 members
    for epoch in range(3):
        batches = _stream(s, s.batches_per_epoch)
        seen = set()
        for batch in batches:
            indices = [i for i, _ in batch]
            assert len(indices) == 4 and len({BUCKETS[i] for i in indices}) == 1
            seen.update(indices)
        assert seen == set(range(len(BUCKETS)))
    assert s.state_dict()["epoch"] == 3 and s.state_dict()["position"] == 0
    # epochs differ, seeds matter, visit seeds change with the epoch
    a = BucketBatches(BUCKETS, seed=5, batch_size=4)
    first, second = _stream(a, 4), _stream(a, 4)
    assert first != second and first == _stream(BucketBatches(BUCKETS, seed=5, batch_size=4), 4)
    assert first != _stream(BucketBatches(BUCKETS, seed=6, batch_size=4), 4)


@settings(max_examples=50, deadline=None)
@given(buckets=st.lists(st.integers(0, 4), min_size=1, max_size=40), world=st.sampled_from([1, 2, 4]),
       per_rank=st.integers(1, 3), seed=st.integers(0, 2 ** 31), batches=st.integers(1, 30))
def test_ranks_together_see_the_single_process_stream(buckets, world, per_rank, seed, batches):
    size = world * per_rank
    single = _stream(BucketBatches(buckets, seed, batch_size=size), batches)
    ranks = [_stream(BucketBatches(buckets, seed, rank=r, world_size=world, batch_size=size), batches)
             for r in range(world)]
    for b in range(batches):
        assert sum((ranks[r][b] for r in range(world)), []) == single[b]


@settings(max_examples=50, deadline=None)
@given(buckets=st.lists(st.integers(0, 3), min_size=1, max_size=30), done=st.integers(0, 25),
       more=st.integers(1, 10), seed=st.integers(0, 1000))
def test_resume_from_state_at_continues_exactly(buckets, done, more, seed):
    straight = BucketBatches(buckets, seed, batch_size=2)
    _stream(straight, done)
    rest = _stream(straight, more)
    resumed = BucketBatches(buckets, seed, batch_size=2)
    state = resumed.state_at(done * 2)
    assert state == straight.state_at(done * 2)
    resumed.load_state_dict(state)
    assert _stream(resumed, more) == rest


def test_a_changed_dataset_refuses_the_checkpoint_state():
    s = BucketBatches(BUCKETS, seed=0, batch_size=4)
    state = s.state_at(8)
    with pytest.raises(ConfigError, match="layout"):
        BucketBatches(BUCKETS[:-4] + [3, 3, 3, 3], seed=0, batch_size=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        BucketBatches(BUCKETS, seed=1, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="whole number"):
        s.state_at(6)
