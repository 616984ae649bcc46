"""shoal: a distributed model serving system."""

__version__ = "0.1.0"
