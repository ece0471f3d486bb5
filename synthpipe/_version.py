"""Version of synthpipe. Kept free of imports so setup.py can read it without torch."""

__all__ = ["__version__"]
__version__ = "0.1.0"
