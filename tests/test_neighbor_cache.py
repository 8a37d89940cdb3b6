"""The data pipeline's neighbor-list cache: the same samples as a fresh search, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from dpfit.data.datamodule import DeepmdDataModule, FrameDataset
from dpfit.data.demo import make_demo_dataset
from dpfit.data.sampler import SystemView
from dpfit.data.system import load_systems


@pytest.fixture(scope="module")
def demo_views(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo"), nframes=6)
    systems = load_systems([root], ["Cu", "Ni"])
    return [SystemView(s, np.arange(s.nframes), 1) for s in systems]


def _keys(views):
    return [(s, int(f)) for s, v in enumerate(views) for f in v.indices]


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_cached_samples_equal_fresh_ones(demo_views):
    fresh = FrameDataset(demo_views, 4.0, [72, 72])
    cached = FrameDataset(demo_views, 4.0, [72, 72], cache_mb=64)
    keys = _keys(demo_views)
    for _ in range(2):  # the second pass reads every neighbor list from the cache
        for key in keys:
            _same(cached[key], fresh[key])
    assert len(cached._cache) == len(keys)


def test_cache_stays_within_its_budget(demo_views):
    keys = _keys(demo_views)
    one = FrameDataset(demo_views, 4.0, [72, 72], cache_mb=64)
    one[keys[0]]
    entry = one._cached_bytes
    budget_frames = 3
    small = FrameDataset(demo_views, 4.0, [72, 72], cache_mb=budget_frames * entry / 2**20)
    for key in keys:
        small[key]
        assert small._cached_bytes <= small.cache_bytes
    assert list(small._cache) == keys[-budget_frames:]  # least recently used out first
    small[keys[-budget_frames]]  # a hit moves to the back
    small[keys[0]]
    assert list(small._cache) == [keys[-budget_frames + 1], keys[-1], keys[-budget_frames], keys[0]][-budget_frames:]


def test_no_cache_by_zero_and_bad_values_refused(demo_views):
    off = FrameDataset(demo_views, 4.0, [72, 72], cache_mb=0)
    off[_keys(demo_views)[0]]
    assert not off._cache
    with pytest.raises(ValueError, match="neighbor_cache_mb"):
        DeepmdDataModule(train_systems=["x"], neighbor_cache_mb=-1)
