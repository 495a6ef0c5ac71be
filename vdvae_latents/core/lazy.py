"""Package APIs that import a module only when one of its names is first used (PEP 562).

Every ``__init__.py`` of the library lists its public names by the module that defines
them. Nothing is imported until a name is asked for, so ``import vdvae_latents`` and
``vdvl --help`` cost milliseconds instead of the seconds torch, scikit-learn and zarr
take to import, and a command pays only for the packages it uses.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, modules: dict[str, list[str]]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``modules[m]`` from its submodule ``m``.

    Usage, in a package's ``__init__.py``::

        __getattr__, __dir__, __all__ = lazy_exports(__name__, {"writer": ["StoreWriter"]})

    A name's value is cached in the package once loaded, so only the first use goes through
    ``__getattr__``. No exported name may equal a submodule's name: importing the submodule
    would then replace the exported object with the module.
    """
    home = {name: module for module, names in modules.items() for name in names}
    clash = sorted(set(home) & set(modules))
    if clash:
        raise ValueError(f"{package} exports {clash[0]!r}, which is also the name of one of its modules")

    def __getattr__(name: str) -> object:
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(home) | set(vars(sys.modules[package])))

    return __getattr__, __dir__, list(home)


__all__ = ["lazy_exports"]
