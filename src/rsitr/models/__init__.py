"""Models: encoders (towers), methods (trainable retrieval models) and their registries."""

from rsitr.models.registry import build_config, create_method, get_method_class, list_methods, register_method

__all__ = ["build_config", "create_method", "get_method_class", "list_methods", "register_method"]
