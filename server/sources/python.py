"""``python``: any map-style torch ``Dataset`` made by a factory named in the config.

Code is only ever named by the server's config (``factory = "pkg.mod:fn"``),
never by a client.
"""

from __future__ import annotations

import importlib
from typing import Any

from batchwire.server.config import Table


def import_object(path: str) -> Any:
    """Imports ``package.module:attribute``; raises ``ValueError`` saying why not."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:name', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module raising on import
        raise ValueError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return target


def build(table: Table) -> Any:
    table.reject_unknown({"factory", "kwargs"})
    path = table.get("factory", str)
    kwargs = table.get("kwargs", dict, {})
    try:
        factory = import_object(path)
    except ValueError as exc:
        raise table.error("factory", str(exc)) from None
    if not callable(factory):
        raise table.error("factory", f"{path!r} is a {type(factory).__name__}, not callable")
    try:
        dataset = factory(**kwargs)
    except Exception as exc:
        raise table.error(
            "factory", f"{path}(**kwargs) raised {type(exc).__name__}: {exc}"
        ) from exc
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise table.error(
            "factory",
            f"{path} returned a {type(dataset).__name__}; a map-style Dataset needs __len__ and __getitem__",
        )
    return dataset
