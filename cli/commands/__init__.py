"""One module per ``repfuse`` command; each is a click command registered by ``cli.main``."""
