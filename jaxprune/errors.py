"""Exceptions whose types match what torch.nn.utils.prune raises for the same input.

torch signals some input errors with ``AssertionError`` or ``RuntimeError``. jaxprune raises the Pythonic type
(``ValueError``/``TypeError``) and also subclasses torch's type, so code written against torch keeps catching it.
"""


class ShapeMismatchError(ValueError, AssertionError):
  """A mask or importance-score array whose shape differs from its parameter (torch: ``AssertionError``)."""


class UnsupportedNormError(ValueError, RuntimeError):
  """An ``n`` that ``ln_structured`` cannot compute for this tensor (torch: ``RuntimeError``)."""


class UnsupportedDtypeError(TypeError, RuntimeError):
  """A dtype a method cannot rank (torch: ``RuntimeError``/``NotImplementedError`` from the kernel)."""
