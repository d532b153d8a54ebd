"""Baselines that GGUF chat models are measured against (see ``gguf-factory bench``)."""
