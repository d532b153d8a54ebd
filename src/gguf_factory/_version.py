"""The package version, in a module of its own: any module can read it without importing the package's
public API (``gguf_factory/__init__.py`` imports the verbs, which would make that a circle)."""

__version__ = "0.1.0"
