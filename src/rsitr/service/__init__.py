"""The web service: a FastAPI JSON API and one search page over an index (``rsitr serve``).

Requires the ``serve`` extra (``pip install 'rsitr[serve]'``).
"""

from rsitr.service.app import ServiceConfig, create_app
from rsitr.service.uploads import UploadPolicy

__all__ = ["ServiceConfig", "UploadPolicy", "create_app"]
