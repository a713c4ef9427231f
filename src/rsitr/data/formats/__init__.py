"""Caption format readers, one module per format, registered by name.

Importing this package registers the built-in formats: ``precomp``, ``karpathy``, ``pir``,
``csv`` and ``folder`` (in detection order).
"""

from rsitr.data.formats import csv_format, folder, karpathy, pir, precomp  # noqa: F401
from rsitr.data.formats._registry import (
    CaptionFormat,
    detect_format,
    get_format,
    list_formats,
    register_format,
)

__all__ = ["CaptionFormat", "detect_format", "get_format", "list_formats", "register_format"]
