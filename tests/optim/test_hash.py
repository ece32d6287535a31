"""The counter hash: every implementation equals the NumPy reference of the definition."""

import numpy as np
import pytest
import torch

from maskopt import _hash
from maskopt.reference import hash_u32


@pytest.mark.parametrize("start", [0, 2**31 - 3, 2**32 - 5, 2**33 + 7])
@pytest.mark.parametrize("numel", [0, 1, 10, 4097])
@pytest.mark.parametrize(
    "seed, tensor_index, counter", [(0, 0, 1), (123456789012, 5, 77), (2**40 + 3, 99, 2**33 + 1)]
)
def test_hash_paths_equal_the_reference(start, numel, seed, tensor_index, counter):
    key = _hash.stream_key(seed, tensor_index, counter)
    expected = hash_u32(numel, seed, tensor_index, counter, start=start)
    torch_path = _hash._order_keys_torch(numel, key, "cpu", start).numpy().astype(np.int64) + 2**31
    assert np.array_equal(torch_path.astype(np.uint64), expected)
    public = _hash.hash_keys(numel, key, "cpu", start).numpy().astype(np.uint64)
    assert np.array_equal(public, expected)


def test_threshold_selects_alpha_share_and_all_at_one():
    keys = _hash.order_keys(1_000_000, _hash.stream_key(1, 2, 3))
    assert abs((keys < _hash.signed_threshold(0.3)).float().mean().item() - 0.3) < 0.002
    from maskopt.selection import random_indices

    (everything,) = random_indices([(1000,)], [_hash.stream_key(1, 2, 3)], 1.0)
    assert torch.equal(everything, torch.arange(1000))
    assert len(torch.unique(keys)) == keys.numel()  # a bijection of the index: no ties for exact=True
