"""The torch front end: find the linear regions of an ``nn.Module`` with torch.fx, reduce
each to one conv and write it back (``fuse``: the front end; ``pipeline``: fuse, then
prove, the implementation of ``repfuse.fuse``).

* ``trace``: one graph per module, every called submodule a leaf; a real run of the
  graphs on the example inputs (shapes, captured activations);
* ``values`` / ``ops``: which nodes are linear ops (declarative rule tables);
* ``match``: maximal regions and their dominators;
* ``inline``: opening submodule calls so regions can span module boundaries;
* ``fuser``: the per-module pass (decide, cut, rewrite); ``rewrite``: writing fused
  regions back into a graph;
* ``aten``: lowering ``torch.export`` ATen graphs to the functions the rules know.
"""
