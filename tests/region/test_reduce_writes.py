"""``reduce`` writes a branches' sum into the base branch's kernel when the reduction made
that kernel itself (no kernel-sized copy per sum), and never into a tensor the expression
holds; a non-finite kernel is still traced to its node."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable
from repfuse.region import Add, BatchNorm, Conv, Input, Neg, Scale, node_tensors, reduce
from repfuse.region.reference import evaluate

D = torch.float64


def _block(dtype, c=6, bn=True, seed=0):
    """conv3x3 (+BN 'a') + conv1x1 with a bias (+BN 'b') + BN 'id' of the input: a RepVGG
    block."""
    g = torch.Generator().manual_seed(seed)

    def norm(x, name):
        if not bn:
            return x
        return BatchNorm(x, torch.randn(c, generator=g, dtype=dtype),
                         torch.rand(c, generator=g, dtype=dtype) + 0.5,
                         torch.rand(c, generator=g, dtype=dtype) + 0.5,
                         torch.randn(c, generator=g, dtype=dtype), 1e-5, name)

    w3 = torch.randn(c, c, 3, 3, generator=g, dtype=dtype)
    w1 = torch.randn(c, c, 1, 1, generator=g, dtype=dtype)
    b1 = torch.randn(c, generator=g, dtype=dtype)
    return Add((norm(Conv(Input(c), w3, None, ConvSpec(c, c, 3, padding=1), "c3"), "a"),
                norm(Conv(Input(c), w1, b1, ConvSpec(c, c, 1), "c1"), "b"),
                norm(Input(c), "id")))


class _NewKernels(TorchDispatchMode):
    """Counts the new (not in-place, not view) results of ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor) and out.numel() == self.numel \
                and not name.endswith("_") and out._base is None \
                and not any(out is a for a in args):
            self.made.append(name)
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_a_repvgg_block_makes_one_kernel_sized_tensor(grad):
    """float32 weights: the float64 3x3 kernel the fold makes (without autograd a cast
    scaled in place) is summed into in place, with autograd too: one kernel-sized tensor,
    where a copy per sum made two."""
    expr = _block(torch.float32)
    for t in node_tensors(expr):
        t.requires_grad_(grad)
    with torch.set_grad_enabled(grad), _NewKernels(6 * 6 * 3 * 3) as mode:
        fused = reduce(expr)
    assert len(mode.made) == 1, mode.made
    x = torch.randn(2, 6, 7, 5, dtype=D)
    with torch.no_grad():
        assert (fused.forward(x) - evaluate(expr, x.float()).double()).abs().max() < 1e-4


@pytest.mark.parametrize("bn", [False, True])
def test_the_expression_tensors_are_never_written(bn):
    """float64 weights reach the sum as themselves (no cast copies them): they are read,
    not written, as are the batch norms' tensors."""
    expr = _block(D, bn=bn, seed=3)
    before = [t.clone() for t in node_tensors(expr)]
    x = torch.randn(1, 6, 6, 6, dtype=D)
    ref = evaluate(expr, x)
    fused = reduce(expr)
    assert all(torch.equal(a, b) for a, b in zip(before, node_tensors(expr)))
    assert (fused.forward(x) - ref).abs().max() < 1e-10


def test_a_writing_reduction_is_differentiable():
    """Gradients of a kernel summed in place reach every parameter as through the sum
    written out (finite differences)."""
    expr = _block(D, seed=5)
    leaves = [t.requires_grad_(True) for t in node_tensors(expr) if t.dim() == 4]
    g = torch.Generator().manual_seed(1)
    up = torch.randn(6, 6, 3, 3, generator=g, dtype=D)
    found = torch.autograd.grad((reduce(expr).weight * up).sum(), leaves)
    for leaf, grad in zip(leaves, found):
        want = torch.zeros_like(leaf)
        for k in range(leaf.numel()):
            with torch.no_grad():
                flat = leaf.view(-1)
                keep = float(flat[k])
                flat[k] = keep + 1e-6
                hi = float((reduce(expr).weight * up).sum())
                flat[k] = keep - 1e-6
                lo = float((reduce(expr).weight * up).sum())
                flat[k] = keep
            want.view(-1)[k] = (hi - lo) / 2e-6
        torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-6)


def test_a_non_finite_small_branch_is_named_not_the_base_it_was_summed_into():
    """The 1x1 branch's batch norm divides by zero; the 3x3 branch's kernel, which the sum
    is written into, is finite on its own: the refusal names 'b'."""
    expr = _block(D, seed=2)
    bn_b = expr.inputs[1]
    bn_b.running_var[3] = 0.0
    bn_b.eps = 0.0
    with pytest.raises(NotFusable, match="BatchNorm 'b'.*NaN or infinite"):
        reduce(expr)


@pytest.mark.parametrize("later", [False, True])
def test_a_value_read_twice_is_not_written_before_its_second_read(later):
    """A region expression is a DAG: the folded 3x3 branch is read by a sum and by a scale.
    The sum may write into it only once nothing else is left to read it, whichever of
    the two reads it first."""
    g = torch.Generator().manual_seed(4)
    c = 5
    shared = BatchNorm(Conv(Input(c), torch.randn(c, c, 3, 3, generator=g, dtype=D), None,
                            ConvSpec(c, c, 3, padding=1), "c3"),
                       torch.randn(c, generator=g, dtype=D), torch.rand(c, generator=g,
                                                                       dtype=D) + 0.5,
                       None, None, 1e-5, "a")
    inner = Add((shared, Neg(Input(c))))
    twice = Scale(shared, 2.0, "s")
    expr = Add((twice, inner) if later else (inner, twice))
    x = torch.randn(2, c, 6, 7, generator=g, dtype=D)
    assert (reduce(expr).forward(x) - evaluate(expr, x)).abs().max() < 1e-10
