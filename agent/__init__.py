"""The spegla node agent: containerd access, state tracking, bootstrap, CLI and supervision."""

__version__ = "0.1.0"
