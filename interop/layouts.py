"""Layout rules: where each torch tensor of a module goes in Flax's layout, and how its axes move.

A rule describes one kind of module (Linear, Conv, BatchNorm, ...): for each torch tensor name, the Flax collection,
the Flax name and the axis transform. Masks move with their parameters. Rules are plain data, so users add their own
(or force a built-in kind onto some modules) by passing ``rules=[...]``; theirs are tried first.

Which rule applies to a module, in order:

1. a rule whose ``where`` regex matches the module's path (``"layer1.0.conv1"``): forced, so a tensor that does not
   fit it is an error;
2. when a torch module is given, a rule one of whose ``torch_types`` is a class in the submodule's MRO (forced too);
   a module of a type no rule names keeps torch's names and shapes;
3. without a torch module, the rules that cover every tensor name of the module with fitting ranks and shapes (a
   2-d ``weight`` is a Linear, an Embedding or a Hugging Face ``Conv1D``, a 3- to 5-d one a Conv, ``running_mean``
   a BatchNorm); where several do, :mod:`interop.inference` decides by the module's name, its shapes and its
   neighbours, and records the keys it is unsure of. On the way back Flax's ``embedding`` name is unambiguous.

Tensors no rule covers keep their torch name and shape, in ``params`` (parameters) or ``buffers`` (buffers).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

from interop.errors import LayoutError


class Transform(NamedTuple):
  """An axis permutation taking a torch tensor to its Flax layout; ``perm(ndim)`` gives the axis order."""
  name: str
  perm: Callable[[int], tuple[int, ...]]

  def to_flax(self, ndim: int) -> tuple[int, ...]:
    """The permutation for an ``ndim``-d tensor; ``()`` when it leaves the axes as they are."""
    perm = tuple(self.perm(ndim))
    return () if perm == tuple(range(ndim)) else perm


IDENTITY = Transform("identity", lambda ndim: tuple(range(ndim)))
LINEAR = Transform("linear", lambda ndim: (1, 0))  # torch (out, in) -> Dense kernel (in, out)
CONV = Transform("conv", lambda ndim: (*range(2, ndim), 1, 0))  # torch (O, I, *k) -> Conv kernel (*k, I, O)


class TensorMap(NamedTuple):
  """Where one torch tensor of a module goes: Flax ``collection`` and ``name``, its axis ``transform``, and the
  torch ranks it may have (``None``: any)."""
  collection: str
  name: str
  transform: Transform = IDENTITY
  ndims: Optional[tuple[int, ...]] = None
  matches: Optional[tuple[str, Optional[int]]] = None
  """``(tensor, axis)``: this 1-d tensor's length is that torch axis of the module's other tensor (a Linear's bias
  matches its weight's axis 0, a ``Conv1D``'s axis 1), or with axis None its shape is the other's (a norm's bias);
  checked when a rule is inferred from torch shapes."""

  def fits(self, ndim: int) -> bool:
    return self.ndims is None or ndim in self.ndims


class LayoutRule(NamedTuple):
  """The Flax layout of one kind of module.

  Attributes:
    kind: a name for messages (``"linear"``).
    tensors: torch tensor name (``"weight"``) -> :class:`TensorMap`.
    torch_types: names of torch classes the rule is for; a class anywhere in a module's MRO matches. A name
      starting with ``*`` matches every class whose name ends with the rest (``*RMSNorm``: Hugging Face's
      ``LlamaRMSNorm``, which derives from no torch norm).
    where: a regex searched in module paths (``"layer1.0.conv1"``); matching modules get this rule, no matter what.
    names: a regex searched in module paths that makes this rule the likely one when it is inferred without a
      torch module (``wte`` is an embedding); unlike ``where``, it only breaks ties between rules that fit.
  """
  kind: str
  tensors: Mapping[str, TensorMap]
  torch_types: tuple[str, ...] = ()
  where: Optional[str] = None
  names: Optional[str] = None

  def flax_names(self) -> dict[tuple[str, str], tuple[str, TensorMap]]:
    """``(collection, flax name) -> (torch name, TensorMap)``: the rule read backwards."""
    return {(tm.collection, tm.name): (name, tm) for name, tm in self.tensors.items()}


BATCHNORM = LayoutRule("batchnorm", {
    "weight": TensorMap("params", "scale", ndims=(1,)),
    "bias": TensorMap("params", "bias", ndims=(1,)),
    "running_mean": TensorMap("batch_stats", "mean", ndims=(1,)),
    "running_var": TensorMap("batch_stats", "var", ndims=(1,)),
    "num_batches_tracked": TensorMap("buffers", "num_batches_tracked", ndims=(0,)),
}, torch_types=("_BatchNorm",))
LINEAR_RULE = LayoutRule("linear", {
    "weight": TensorMap("params", "kernel", LINEAR, ndims=(2,)),
    "bias": TensorMap("params", "bias", ndims=(1,), matches=("weight", 0)),
}, torch_types=("Linear",),
                         names=r"(^|\.)(?!c_)(\w*_)?(head|classifier|proj|dense|query|key|value|fc\d*|linear\d*)$")
CONV_RULE = LayoutRule("conv", {
    "weight": TensorMap("params", "kernel", CONV, ndims=(3, 4, 5)),
    "bias": TensorMap("params", "bias", ndims=(1,), matches=("weight", 0)),  # a ConvTranspose's: axis 1 * groups
}, torch_types=("Conv1d", "Conv2d", "Conv3d"))
NORM_RULE = LayoutRule("norm", {"weight": TensorMap("params", "scale"),
                                "bias": TensorMap("params", "bias", matches=("weight", None))},
                       torch_types=("LayerNorm", "GroupNorm", "RMSNorm", "_InstanceNorm", "*RMSNorm", "*LayerNorm"))
EMBEDDING_RULE = LayoutRule("embedding", {"weight": TensorMap("params", "embedding", ndims=(2,))},
                            torch_types=("Embedding",),
                            names=r"(^|\.)(\w+_)?(embeddings?|embed(_\w+)?|wte|wpe)$")
CONV1D_HF_RULE = LayoutRule("conv1d_hf", {
    "weight": TensorMap("params", "kernel", IDENTITY, ndims=(2,)),  # stored (in, out) already: no transpose
    "bias": TensorMap("params", "bias", ndims=(1,), matches=("weight", 1)),
}, torch_types=("Conv1D",), names=r"(^|\.)c_(attn|proj|fc)$|(^|\.)(attn|mlp)\.c_\w+$")
"""Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): a dense layer whose weight is (in, out)."""
TORCH_RULE = LayoutRule("torch", {})
"""Keeps torch's names and shapes (forced with :func:`rule_for`, e.g. for a module inference would map)."""

BUILTIN_RULES: tuple[LayoutRule, ...] = (BATCHNORM, LINEAR_RULE, CONV_RULE, NORM_RULE, EMBEDDING_RULE,
                                         CONV1D_HF_RULE)
"""Tried in this order after the user's rules; where several fit a module, the first is the default guess."""
KINDS: tuple[str, ...] = (*(r.kind for r in BUILTIN_RULES), TORCH_RULE.kind)


def rule_for(kind: str, where: str) -> LayoutRule:
  """A built-in rule (one of :data:`KINDS`: ``"linear"``, ``"conv"``, ``"batchnorm"``, ``"norm"``,
  ``"embedding"``, ``"conv1d_hf"``, or ``"torch"`` to keep torch's layout) forced onto the modules whose path
  matches the regex ``where``, e.g. ``rule_for("embedding", r"(^|\\.)tok_emb$")``."""
  for rule in (*BUILTIN_RULES, TORCH_RULE):
    if rule.kind == kind:
      return rule._replace(where=where, torch_types=(), names=None)
  raise ValueError(f"unknown layout kind {kind!r}; known kinds: {list(KINDS)}")


def _covers(rule: LayoutRule, names: Mapping, side: str) -> bool:
  table = rule.tensors if side == "torch" else {k: tm for k, (_, tm) in rule.flax_names().items()}
  return all(name in table and table[name].fits(ndim) for name, ndim in names.items())


def rule_by_path(rules: Sequence[LayoutRule], path: str) -> Optional[LayoutRule]:
  """The first rule whose ``where`` regex matches the module path, if any (such a rule is forced)."""
  return next((r for r in (*rules, *BUILTIN_RULES) if r.where is not None and re.search(r.where, path)), None)


def select_rule(rules: Sequence[LayoutRule], path: str, names: Mapping, *, types: Optional[Sequence[str]] = None,
                side: str = "torch") -> tuple[Optional[LayoutRule], bool]:
  """The rule for the module at ``path`` and whether it was forced (``where`` or torch type) or inferred.

  Args:
    rules: the user's rules; the built-in ones are tried after them.
    path: the torch module path (``"layer1.0.conv1"``; ``""`` for the root module).
    names: the module's tensors, name -> rank: torch names on the torch side, ``(collection, flax name)`` pairs on
      the Flax side.
    types: the torch class names in the module's MRO when a torch module is at hand, else None.
    side: ``"torch"`` or ``"flax"``, which names ``names`` holds.
  """
  candidates = (*rules, *BUILTIN_RULES)
  rule = rule_by_path(rules, path)
  if rule is not None:
    return rule, True
  if types is not None:
    for rule in candidates:
      if rule.where is None and _is_of(rule.torch_types, types):
        return rule, True
    return None, False
  fitting = [rule for rule in candidates if rule.where is None and _covers(rule, names, side)]
  hinted = [rule for rule in fitting if rule.names is not None and re.search(rule.names, path)]
  return next(iter(hinted or fitting), None), False


def _is_of(torch_types: Sequence[str], types: Sequence[str]) -> bool:
  return any(t == name or (t.startswith("*") and name.endswith(t[1:])) for t in torch_types for name in types)


def covering(rules: Sequence[LayoutRule], names: Mapping[str, int]) -> list[LayoutRule]:
  """Every rule (the user's, then the built-in ones; none with a ``where``) that covers torch tensor names with
  these ranks, one per kind."""
  out: dict[str, LayoutRule] = {}
  for rule in (*rules, *BUILTIN_RULES):
    if rule.where is None and _covers(rule, names, "torch"):
      out.setdefault(rule.kind, rule)
  return list(out.values())


def consistent(rule: LayoutRule, shapes: Mapping[str, Sequence[int]]) -> bool:
  """Whether the module's torch shapes agree with the rule's ``matches`` (a bias as long as the right axis)."""
  for name, tm in rule.tensors.items():
    if tm.matches is not None and name in shapes and tm.matches[0] in shapes:
      other, axis = tm.matches
      if axis is None:
        if tuple(shapes[name]) != tuple(shapes[other]):
          return False
      elif len(shapes[other]) <= axis or tuple(shapes[name]) != (shapes[other][axis],):
        return False
  return True


def check_fit(rule: LayoutRule, path: str, key: str, tm: TensorMap, shape: Sequence[int]) -> None:
  """Raises :class:`LayoutError` when a forced rule's tensor map does not fit ``key``'s rank."""
  if not tm.fits(len(shape)):
    ranks = " or ".join(str(n) for n in tm.ndims)
    raise LayoutError(f"layout rule {rule.kind!r} for module {path!r} expects {key!r} to be {ranks}-d "
                      f"(to become {tm.collection}/{tm.name} by a {tm.transform.name!r} transform), but its shape "
                      f"is {tuple(shape)}; pass a rule that fits (rules=[...]) or the torch module (module=...)")
