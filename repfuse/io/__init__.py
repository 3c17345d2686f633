"""Files: the only atomic writer (``atomic``), the only checkpoint loader
(``checkpoint``), model files (``modelfile``: ``.pt2`` programs, pickled modules) and the
writers of each output format (``writers``). ONNX files: ``repfuse.onnx.io``."""

from repfuse.io.atomic import atomic_write, check_output_path, same_file
from repfuse.io.checkpoint import load_checkpoint, read_checkpoint
from repfuse.io.writers import OUTPUT_FORMATS, output_format

__all__ = ["OUTPUT_FORMATS", "atomic_write", "check_output_path", "load_checkpoint",
           "output_format", "read_checkpoint", "same_file"]
