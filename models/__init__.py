"""repfuse.models."""
