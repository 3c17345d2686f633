"""Python's garbage collector while a model is fused and proven.

A full collection visits every tracked object of the oldest generation. A process that has
imported torch and a model zoo holds about 400,000 of them before conversion starts, and
conversion allocates enough (fx graphs, region expressions, the proofs' autograd graphs) to
trigger several full collections: measured with a gc callback, 0.44 s of 2.57 s of
``fuse(verify=True)`` on timm's repvgg_a0 at 1x3x224x224 and 0.43 s of 2.03 s on
ultralytics yolov8n (one thread). Conversion cannot turn any of those older objects into
garbage, so for its duration they are moved to the permanent generation (``gc.freeze``):
objects made during conversion are collected as usual, and at the end the frozen ones
return to the oldest generation (``gc.unfreeze``), so a cycle the caller drops meanwhile is
collected by a later collection as before.

A caller that froze objects itself (a server before forking workers), or that disabled the
collector, keeps its own setting: nothing is done then. A conversion inside another one
(``fuse`` verifying through ``verify``) finds the heap frozen and leaves it to the outer one.
"""

from __future__ import annotations

import contextlib
import gc

__all__ = ["frozen_heap"]


@contextlib.contextmanager
def frozen_heap():
    """Run the body with the objects that exist now frozen (see the module's text)."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
