"""Option families shared by the commands: input shape, tolerance, output control (the
model options: ``repfuse.cli.spec``)."""

from __future__ import annotations

import re

import click

from repfuse.cli.context import set_debug

DEFAULT_SHAPE = (1, 3, 224, 224)
#: Largest example input accepted (elements); bigger shapes are a typo, not a model input.
MAX_INPUT_ELEMENTS = 1 << 27
MAX_DIM = 1 << 16


class ShapeType(click.ParamType):
    """``1,3,224,224`` (or ``1x3x224x224``): 2 to 5 positive integers of sane size."""

    name = "SHAPE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        parts = [p for p in re.split(r"[,x\s]+", text.strip("()[] ")) if p]
        if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
            self.fail(f"{text!r} is not a shape; write it like 1,3,224,224", param, ctx)
        dims = tuple(int(p) for p in parts)
        if not 2 <= len(dims) <= 5:
            self.fail(f"{text!r} has {len(dims)} dimensions; give 2 to 5, like 1,3,224,224",
                      param, ctx)
        if any(d < 1 for d in dims):
            self.fail(f"{text!r} has a zero dimension; every size must be at least 1",
                      param, ctx)
        total = 1
        for d in dims:
            total *= d
        if any(d > MAX_DIM for d in dims) or total > MAX_INPUT_ELEMENTS:
            self.fail(f"{text!r} is too large ({total:.3g} elements); use a realistic input "
                      "shape such as 1,3,224,224", param, ctx)
        return dims


SHAPE = ShapeType()


def output_options(fn):
    """--json / --quiet / --debug."""
    decorators = [
        click.option("--json", "json_path", metavar="REPORT.json",
                     type=click.Path(dir_okay=False),
                     help="Write the full report as JSON to this file."),
        click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors."),
        click.option("--debug", is_flag=True, expose_value=False, callback=set_debug,
                     is_eager=True, help="Show full tracebacks and library logs."),
    ]
    for dec in reversed(decorators):
        fn = dec(fn)
    return fn


def parse_tol(value: str | None):
    """``--tol``: one number (absolute and relative) or ``ATOL,RTOL``."""
    if value is None:
        return None
    parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a number like 1e-5, or ATOL,RTOL") from None
    if not 1 <= len(nums) <= 2 or any(not (n > 0) or n == float("inf") for n in nums):
        raise click.BadParameter(f"{value!r}: give one or two positive numbers (ATOL[,RTOL])")
    return nums[0] if len(nums) == 1 else (nums[0], nums[1])


def tol_option(fn):
    return click.option(
        "--tol", metavar="ATOL[,RTOL]",
        callback=lambda ctx, param, value: parse_tol(value),
        help="Tolerance of the equivalence checks [default: by dtype, see repfuse.proofs].")(fn)
