"""rsitr: remote sensing image-text retrieval toolkit."""

from rsitr.errors import DataError, RsitrError

__version__ = "0.1.0"

__all__ = ["DataError", "RsitrError", "__version__"]
