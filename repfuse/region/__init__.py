"""The front-end-neutral region expression and what is done with it.

* ``nodes``: the node types, each declaring its facts once;
* ``layout``: the value layouts (NCHW, NHWC, NCL, NLC, NC) and their canonical view;
* ``tree``: the one set of utilities that walk an expression;
* ``reducers``: ``reduce``, the expression as one ``AffineConv`` (algebra only), and
  ``reduce_shapes``, the same reducers on the shapes only (``meta`` tensors: no kernel);
* ``reference``: ``evaluate``, the independent evaluator the proofs compare against;
* ``description``: ``describe``, branch kinds for reports;
* ``op``: the operation kinds and ``LinearOp`` both front ends return;
* ``worth``: whether a region is worth fusing, the growth limit, the refusals the shapes
  decide (``shape_refusal``) and ``Attempts``, each region part tried once, shapes first;
* ``registry``: where reducers, evaluators and descriptions are registered.

Adding a node type: one class in ``nodes`` plus its reducer, evaluator and description
here, and a rule in each front end (``repfuse.fx.ops``, ``repfuse.onnx.match``);
``registry.missing_rules`` (tested) names whatever is missing.
"""

from repfuse.region import layout, reference
from repfuse.region.computed import Computed
from repfuse.region.description import describe
from repfuse.region.nodes import *  # noqa: F403  (the node types)
from repfuse.region.nodes import __all__ as _node_names
from repfuse.region.op import LinearOp, OpKind, is_region_value
from repfuse.region.reducers import reduce, reduce_shapes
from repfuse.region.reference import evaluate
from repfuse.region.tree import (
    children,
    count_params,
    dtype_device,
    input_channels,
    label,
    materialized,
    node_tensors,
    parameters,
    read_window,
    region_input,
    sources,
    substitute,
    value_layouts,
    walk,
    with_input,
)
from repfuse.region.worth import (
    GROWTH_LIMIT,
    Attempts,
    check_growth,
    direct,
    shape_refusal,
    worthwhile,
)

__all__ = [
    *_node_names, "GROWTH_LIMIT", "Attempts", "Computed", "LinearOp", "OpKind", "check_growth",
    "children", "count_params", "describe", "direct", "dtype_device", "evaluate",
    "input_channels", "is_region_value", "label", "layout", "materialized", "node_tensors",
    "parameters", "read_window", "reduce", "reduce_shapes", "reference", "region_input",
    "shape_refusal", "sources", "substitute", "value_layouts", "walk", "with_input",
    "worthwhile",
]
