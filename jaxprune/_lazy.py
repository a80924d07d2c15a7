"""Lazy package attributes (PEP 562): the public names of a package imported on first use, not with the package.

``jaxprune`` and ``interop`` both use it, so that ``jaxprune inspect`` can import them without importing JAX.
"""
import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_attributes(package: str, exports: Mapping[str, Sequence[str]], namespace: dict
                    ) -> tuple[Callable[[str], Any], Callable[[], list]]:
  """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a submodule to the names it provides; any other
  attribute that names a submodule (``jaxprune.selection``) imports that submodule. A value found is stored in
  ``namespace`` (the package's globals), so each name is looked up once."""
  module_of = {name: module for module, names in exports.items() for name in names}

  def getattr_(name: str) -> Any:
    module = module_of.get(name)
    if module is not None:
      value = getattr(importlib.import_module(f"{package}.{module}"), name)
    else:
      try:
        value = importlib.import_module(f"{package}.{name}")
      except ModuleNotFoundError as err:
        if err.name != f"{package}.{name}":  # the submodule exists but an import inside it failed
          raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    namespace[name] = value
    return value

  def dir_() -> list:
    return sorted({*namespace, *module_of, *exports})

  return getattr_, dir_
