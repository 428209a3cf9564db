"""PEP 562 lazy exports: a package lists its public names per module and imports a module on first use.

``msq_hf`` and ``msq_hf.pipeline`` use it so that importing them (and ``msq-hf --help``) costs no torch,
transformers or timm until a name that needs them is touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, public: Mapping[str, tuple[str, ...]], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``public`` maps module -> the public names it defines.

    ``__getattr__(name)`` imports the name's module, stores the value in ``namespace`` (the package's globals,
    so the next access is a plain lookup) and returns it; unknown names raise ``AttributeError``. ``__dir__``
    lists the public names, ``namespace['__all__']`` and the submodules loaded so far.
    """
    home = {name: module for module, names in public.items() for name in names}

    def __getattr__(name: str) -> Any:  # noqa: N807 -- the module-level hook's required name
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        loaded = {n for n, v in namespace.items() if getattr(v, "__name__", None) == f"{package}.{n}"}
        return sorted(set(home) | set(namespace.get("__all__", ())) | loaded)

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
