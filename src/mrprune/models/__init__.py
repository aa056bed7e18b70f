"""Loading models and reaching their parts."""

from .adapter import ADAPTERS, LinearRef, ModelAdapter, get_adapter
from .loading import LoadedModel, load_model, resolve_device, resolve_dtype

__all__ = ["ADAPTERS", "LinearRef", "LoadedModel", "ModelAdapter", "get_adapter", "load_model", "resolve_device",
           "resolve_dtype"]
