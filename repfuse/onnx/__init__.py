"""The ONNX front end and everything ONNX.

* ``io``: the one ONNX loader (validated, external data only from the model's folder)
  and atomic saving;
* ``match``: which nodes are linear ops (the ``_RULES`` table) and constant folding;
* ``regions``: candidate regions, cuts, and fusing a graph in place; ``rewrite``:
  writing one fused region back as a Conv;
* ``readers``: a BatchNormalization read by several layers copied into each reader;
* ``pipeline``: load, fuse, prove per region, check with onnxruntime
  (``repfuse.fuse_onnx``);
* ``runtime``: onnxruntime sessions, random inputs, comparisons, ``OnnxRunner``;
* ``export``: torch -> ONNX checked with onnxruntime (``repfuse.export_onnx``).
"""
