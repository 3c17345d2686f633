"""The torch front end: find the linear regions of an ``nn.Module`` with torch.fx, reduce
each to one conv and write it back (``fuse``: the front end; ``pipeline``: fuse, then
prove, the implementation of ``repfuse.fuse``).

* ``trace``: one graph per module, every called submodule a leaf;
* ``reach``: one real run of the model on the example inputs that traces every module it
  calls, runs the traced ones through their graphs (shapes, captured activations) and the
  untraceable ones as their own Python, descending to the modules they call;
* ``values`` / ``ops`` / ``slicing``: which nodes are linear ops (declarative rule
  tables; values computed in forward from parameters; pads and crops written as slicing);
* ``match``: maximal regions and their dominators;
* ``inline``: opening submodule calls so regions can span module boundaries;
* ``norms``, ``distribute``, ``readers``: moving eval batch norms to where they fold (into
  the parts of a concat of convs; a copy into each of several readers);
* ``fuser``: the per-module pass (decide, cut, rewrite); ``rewrite``: writing fused
  regions back into a graph; ``install``: the rewritten graph into its module, which keeps
  its class, attributes and hooks;
* ``account``: what became of every conv and norm layer, and the whole-model counts;
* ``aten``: lowering ``torch.export`` ATen graphs to the functions the rules know.
"""
