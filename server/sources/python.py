"""``python``: any map-style torch ``Dataset`` made by a factory named in the config.

Code is only ever named by the server's config (``factory = "pkg.mod:fn"``),
never by a client.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from batchwire.server.config import Table


def import_object(path: str) -> Any:
    """Imports ``package.module:attribute``; raises ``ValueError`` saying why not."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:name', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or the module raising on import
        # Where imports look is worth saying only when the module itself (or its
        # package) is missing, not something it imports.
        missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None
        missing = missing and f"{module_name}.".startswith(f"{exc.name}.")
        raise ValueError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
            + (f"; {_where()}" if missing else "")
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return target


def searched_folders() -> list[str]:
    """The folders an import searches besides the interpreter's own (stdlib, installed
    packages): the config's ``python_path``, ``$PYTHONPATH``, the script's folder."""
    own = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    folders = []
    for entry in sys.path:
        folder = Path(entry or os.getcwd()).resolve()
        if not any(folder.is_relative_to(prefix) for prefix in own) and str(folder) not in folders:
            folders.append(str(folder))
    return folders


def _where() -> str:
    folders = searched_folders()
    searched = ", ".join(f if os.path.isdir(f) else f"{f} (no such folder)" for f in folders)
    return (
        f"folders searched besides the installed packages: {searched or 'none'}; put the module in "
        "one of them, or add its folder to python_path in [server] (relative to the config file)"
    )


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
