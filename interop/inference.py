"""Which layout rule each module of a bare state_dict gets in Flax layout, and which keys that is unsure of.

Without a torch module, a module's tensor names and ranks often fit several rules: a 2-d ``weight`` with a
``bias`` is a Linear (out, in) or a Hugging Face ``Conv1D`` (in, out); a 2-d ``weight`` alone is also an Embedding
(vocab, dim). The evidence, strongest first:

1. shapes: a bias as long as the weight's axis 0 is a Linear's or a Conv's, as long as axis 1 a ``Conv1D``'s
   (rule ``matches``); a module whose shapes fit no rule (a ConvTranspose's bias is as long as its weight's axis
   1) keeps torch's layout, in doubt;
2. the module's name: a rule's ``names`` regex (``wte``, ``*_embeddings``, ``c_attn``, ``query``, ...);
3. neighbours: the rule every other module under the same parent got by 1 or 2 (GPT-2's square ``attn.c_proj``
   beside ``attn.c_attn``), in doubt for a bare 2-d weight (a Linear beside it does not tell a bias-free Linear
   from an Embedding); for a bare 2-d weight, a first axis as long as a vocabulary (an embedding found by 1 or 2)
   means an embedding;
4. otherwise the first rule that fits: in doubt when a module of the checkpoint was found to be of one of the
   other kinds, or when it is a bare 2-d weight (a bias-free Linear or an Embedding).

Every module decided at step 3 from a vocabulary or from the neighbours of a bare 2-d weight, or at step 4 with
doubt, is reported (its keys, and what else it could be), never guessed silently; a ``where`` rule or
``module=`` settles it.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

from interop import layouts
from interop.layouts import LayoutRule

Shapes = Mapping[str, tuple[int, ...]]


def _parent(path: str) -> str:
  return path.rpartition(".")[0]


def _by_name(fitting: Sequence[LayoutRule], path: str) -> list[LayoutRule]:
  return [rule for rule in fitting if rule.names is not None and re.search(rule.names, path)]


def _distinct(fitting: Sequence[LayoutRule], shapes: Shapes) -> list[LayoutRule]:
  """The first of the rules that would place these tensors alike (a BatchNorm's and a LayerNorm's ``weight`` and
  ``bias`` both become ``scale`` and ``bias``): choosing between them is no choice."""
  out: dict[tuple, LayoutRule] = {}
  for rule in fitting:
    effect = tuple((tm.collection, tm.name, tm.transform.name) if tm is not None else None
                   for tm in (rule.tensors.get(name) for name in shapes))
    out.setdefault(effect, rule)
  return list(out.values())


def infer(rules: Sequence[LayoutRule], modules: Mapping[str, Shapes]
          ) -> dict[str, tuple[Optional[LayoutRule], Optional[str]]]:
  """``path -> (rule, doubt)`` for modules given as ``path -> {torch name: shape}``; ``doubt`` is None or a note
  of what else the module could be."""
  out: dict[str, tuple[Optional[LayoutRule], Optional[str]]] = {}
  pending: dict[str, list[LayoutRule]] = {}
  cache: dict[frozenset, list[LayoutRule]] = {}
  for path, shapes in modules.items():
    kind = frozenset((name, len(shape)) for name, shape in shapes.items())
    if kind not in cache:
      cache[kind] = layouts.covering(rules, dict(kind))
    fitting = _distinct([rule for rule in cache[kind] if layouts.consistent(rule, shapes)], shapes)
    if cache[kind] and not fitting:  # names and ranks fit, shapes do not: a ConvTranspose's bias is its axis 1's
      out[path] = (None, f"its shapes fit no {' or '.join(r.kind for r in cache[kind])} layout (a bias as long as "
                   "no axis that rule expects, as a ConvTranspose's), so kept in torch's layout")
      continue
    fitting = _by_name(fitting, path)[:1] or fitting
    if len(fitting) <= 1:
      out[path] = (next(iter(fitting), None), None)
    else:
      pending[path] = fitting
  found = {rule.kind for rule, _ in out.values() if rule is not None}
  vocabularies = {shapes["weight"][0] for path, shapes in modules.items()
                  if path in out and out[path][0] is not None and out[path][0].kind == "embedding"}
  siblings: dict[str, set[str]] = {}
  for path, (rule, _) in out.items():
    if rule is not None:
      siblings.setdefault(_parent(path), set()).add(rule.kind)
  for path, fitting in pending.items():
    kinds = [rule.kind for rule in fitting]
    bare = "embedding" in kinds and set(modules[path]) == {"weight"}  # a bias-free Linear or an Embedding
    near = siblings.get(_parent(path), set()) & set(kinds)
    weight = modules[path].get("weight", ())
    if len(near) == 1:
      kind = near.pop()
      # Siblings tell a Linear from a Conv1D (the same tensors, other axes), not from an Embedding
      # (pytorch/examples' language model: an `encoder` Embedding beside a `decoder` Linear): a guess, so said.
      doubt = f"taken for {kind} like its siblings; could be {' or '.join(k for k in kinds if k != kind)}"
      out[path] = (fitting[kinds.index(kind)], doubt if bare else None)
    elif bare and weight[0] in vocabularies:
      out[path] = (fitting[kinds.index("embedding")], f"its first axis ({weight[0]}) is a vocabulary's, so "
                   f"taken for an embedding; could be {' or '.join(k for k in kinds if k != 'embedding')}")
    else:
      others = kinds[1:]
      doubt = f"taken for {kinds[0]}; could be {' or '.join(others)}" if bare or found & set(others) else None
      out[path] = (fitting[0], doubt)
  return out
