"""core.layout.memory_order_flat: the elements of a tensor in memory order."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repfuse.core.layout import memory_order_flat


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=4), data=st.data())
def test_permuted_dense_tensors_flatten_without_a_copy(shape, data):
    base = torch.randn(shape, dtype=torch.float64)
    order = data.draw(st.permutations(range(len(shape))))
    t = base.permute(*order) if shape else base        # dense in memory, any view order
    flat = memory_order_flat(t)
    assert flat.dim() == 1 and flat.numel() == t.numel()
    assert flat.data_ptr() == t.data_ptr()            # a view, not a copy
    assert torch.equal(torch.sort(flat).values, torch.sort(t.reshape(-1)).values)
    assert torch.equal(flat, base.reshape(-1))        # the order of memory


def test_channels_last_is_read_in_memory_order():
    t = torch.randn(3, 5, 2, 4).contiguous(memory_format=torch.channels_last)
    flat = memory_order_flat(t)
    assert flat.data_ptr() == t.data_ptr()
    assert torch.equal(flat, t.permute(0, 2, 3, 1).reshape(-1))


def test_a_tensor_with_gaps_is_copied_whole():
    t = torch.randn(6, 8)[::2, 1:7]
    flat = memory_order_flat(t)
    assert torch.equal(torch.sort(flat).values, torch.sort(t.reshape(-1)).values)
    assert flat.numel() == t.numel()
