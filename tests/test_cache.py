"""The in-place key/value cache against transformers' DynamicCache, and the additive SDPA mask."""

import pytest
import torch
from transformers import DynamicCache

from sdrpn.models.base import decoder_attention_mask
from sdrpn.models.cache import AppendCache


def _states(generator, tokens, batch=2, heads=3, dim=4):
    return (torch.randn(batch, heads, tokens, dim, generator=generator),
            torch.randn(batch, heads, tokens, dim, generator=generator))


def _assert_same(ours, theirs, layers):
    for layer in range(layers):
        assert ours.get_seq_length(layer) == theirs.get_seq_length(layer)
        assert torch.equal(ours.layers[layer].keys, theirs.layers[layer].keys)
        assert torch.equal(ours.layers[layer].values, theirs.layers[layer].values)


@pytest.mark.parametrize("steps", [
    [("add", 7), ("add", 1), ("add", 1), ("add", 1)],  # prefill, then decode steps
    [("add", 5), ("crop", 2), ("add", 4), ("add", 1)],  # stage 1, question cropped, stage 2, decode
    [("add", 3)] + [("add", 1)] * 40,  # growth past the first room
    [("add", 6), ("crop", 6), ("add", 2)],  # cropped to nothing
])
def test_append_cache_holds_what_dynamic_cache_holds(steps):
    generator = torch.Generator().manual_seed(0)
    ours, theirs = AppendCache(), DynamicCache()
    for op, count in steps:
        for layer in range(2):
            if op == "add":
                keys, values = _states(generator, count)
                returned = ours.update(keys, values, layer)
                expected = theirs.update(keys, values, layer)
                assert all(torch.equal(a, b) for a, b in zip(returned, expected))
            else:
                ours.layers[layer].crop(-count)
                theirs.layers[layer].crop(-count)
        _assert_same(ours, theirs, 2)


def test_appends_within_the_room_write_in_place():
    generator = torch.Generator().manual_seed(1)
    cache = AppendCache()
    cache.update(*_states(generator, 10), 0)
    cache.update(*_states(generator, 1), 0)  # the first append makes room
    storage = cache.layers[0].keys.data_ptr()
    for _ in range(5):
        keys, _ = cache.update(*_states(generator, 1), 0)
        assert keys.data_ptr() == storage
    assert cache.get_seq_length(0) == 16


def test_batch_reindexing_is_followed():
    generator = torch.Generator().manual_seed(2)
    ours, theirs = AppendCache(), DynamicCache()
    for cache in (ours, theirs):
        cache.update(*_states(torch.Generator().manual_seed(3), 4), 0)
        cache.update(*_states(torch.Generator().manual_seed(4), 1), 0)
        cache.layers[0].batch_select_indices(torch.tensor([1]))
    keys, values = _states(generator, 2, batch=1)
    ours.update(keys, values, 0)
    theirs.update(keys, values, 0)
    _assert_same(ours, theirs, 1)


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_mask_is_the_additive_form_of_the_bool_mask(padded):
    generator = torch.Generator().manual_seed(5)
    query_length, key_length = 4, 9
    key_mask = torch.ones(2, key_length, dtype=torch.bool)
    if padded:
        key_mask[0, :3] = False
        key_mask[1, 6] = False
    mask = decoder_attention_mask("sdpa", key_mask, query_length, key_length, torch.float32, torch.device("cpu"))
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, float("-inf")}
    query_index = torch.arange(key_length - query_length, key_length)[:, None]
    allowed = (torch.arange(key_length)[None] <= query_index) & key_mask[:, None, None, :]
    allowed |= torch.arange(key_length)[None] == query_index
    assert torch.equal(mask == 0, allowed)
    q = torch.randn(2, 3, query_length, 8, generator=generator)
    k, v = (torch.randn(2, 3, key_length, 8, generator=generator) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.equal(sdpa(q, k, v, attn_mask=mask), sdpa(q, k, v, attn_mask=allowed))
