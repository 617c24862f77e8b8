"""Doctest collection of the package: modules for optional packages need those packages."""

import importlib.util

#: loraplug modules that import an optional package, imported only when a model needs them.
_OPTIONAL = {"loraplug/_bnb.py": "bitsandbytes", "loraplug/_torchao.py": "torchao"}

collect_ignore = [path for path, package in _OPTIONAL.items()
                  if importlib.util.find_spec(package) is None]
