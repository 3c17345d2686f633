"""repfuse.cli."""
