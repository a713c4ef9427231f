"""Retrieval methods (one file each), registered by name."""

# Importing the method modules registers them (the registry, rsitr.models.registry, is a leaf).
from rsitr.models.methods import cmpagl, dual, msa, rdb  # noqa: E402, F401
