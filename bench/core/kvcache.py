"""The key-value cache argument of a transformers model, across transformers versions.

transformers 5 names it `cache` (in and out); earlier versions `past_key_values`, which 5.x
still accepts with a deprecation warning until it is removed (announced for 5.40). Code that
runs a model with a cache asks here which name the model's own `forward` takes, so it works on
both without a warning.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=None)
def _arg_of(forward_owner: type) -> str:
    try:
        params = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(module: Any) -> str:
    """The keyword `module.forward` takes its key-value cache by: "cache" or "past_key_values"."""
    return _arg_of(type(module))


def with_cache(module: Any, cache: Any) -> dict:
    """`{name: cache}` to pass to `module(...)`, under the name its forward takes."""
    return {cache_arg(module): cache}


def cache_of(output: Any) -> Any:
    """The key-value cache a model returned (`output.cache` in transformers 5, else
    `output.past_key_values`), or None."""
    fields = getattr(output, "__dataclass_fields__", {})
    if "cache" in fields:
        return output.cache
    return getattr(output, "past_key_values", None)
