"""The shared worth-fusing rule (both front ends use it)."""

from __future__ import annotations

import pytest

from repfuse.region.kinds import OpKind as K
from repfuse.region.worth import worth_fusing


@pytest.mark.parametrize("kinds, worth", [
    ([K.CONV], False),
    ([K.CONV, K.PASS, K.PASS], False),
    ([K.CONV, K.NORM], True),
    ([K.CONV, K.AFFINE], True),
    ([K.NORM], False),
    ([K.NORM, K.PASS], False),
    ([K.NORM, K.NORM], True),              # two chained norms become one
    ([K.NORM, K.COMBINE, K.NORM], True),   # batch-norm branches summed
    ([K.NORM, K.AFFINE], True),
    ([K.AFFINE, K.AFFINE], False),         # x * a + b alone is not turned into a conv
    ([K.COMBINE, K.AFFINE], False),
    ([], False),
])
def test_worth_fusing(kinds, worth):
    assert worth_fusing(kinds) is worth
