"""Lazy public names, so that TensorFlow loads only when it is used.

`import splitkeras` (and `splitkeras.data`) must work on a device that has
no TensorFlow: the edge client (`splitkeras.edge`) uses the wire format,
the IDX reader and the handoff sealing, none of which need it. The public
names of a package resolve on first use instead.
"""

from __future__ import annotations

import importlib
import sys
import types

_TF_MODULES = ("tensorflow", "keras", "tensorflow_datasets")


class _Package(types.ModuleType):
    """A package whose public function may share a submodule's name.

    `splitkeras.cut` is the function, as it was before names became lazy:
    loading the submodule `splitkeras/cut.py` must not replace it.
    """

    def __setattr__(self, name, value):
        exports = self.__dict__.get("_EXPORTS", {})
        if isinstance(value, types.ModuleType) and exports.get(name) == value.__name__:
            return  # the import system binding a submodule over a public name
        super().__setattr__(name, value)


def attach(package: str, exports: dict):
    """(__getattr__, __dir__) for `package` resolving `exports` = {name: module}."""
    sys.modules[package].__class__ = _Package

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as e:
            if e.name not in _TF_MODULES:
                raise
            raise ImportError(
                f"{package}.{name} needs {e.name}, which is not installed: "
                "install splitkeras with its TensorFlow extra, "
                "pip install 'splitkeras[tf]' (a device running only the edge "
                "client needs 'splitkeras[edge]')"
            ) from e
        importlib.import_module(package).__dict__[name] = value
        return value

    def __dir__():
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
