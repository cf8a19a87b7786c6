"""An mlx-serving worker built on mlx-lm: the worker protocol of docs/protocol.md over stdio."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
