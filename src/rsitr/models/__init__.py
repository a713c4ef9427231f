"""Models: encoders (towers), methods (trainable retrieval models) and their registries."""

from rsitr.models import methods  # noqa: E402, F401  (registers the methods)
from rsitr.models.registry import build_config, create_method, get_method_class, list_methods, register_method

__all__ = ["build_config", "create_method", "get_method_class", "list_methods", "register_method"]
