"""torch.nn.utils.prune as the oracle: run its methods on a real module and read back the mask buffer."""
import numpy as np
import torch
import torch.nn.utils.prune as tprune

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def holder(x: np.ndarray, dtype: str = "float32") -> torch.nn.Module:
  """A module with one parameter named ``weight``, as torch's methods need."""
  module = torch.nn.Module()
  module.weight = torch.nn.Parameter(torch.tensor(np.asarray(x, np.float32)).to(TORCH_DTYPES[dtype]))
  return module


def apply(module: torch.nn.Module, method: str, **kwargs) -> np.ndarray:
  """Prunes ``module.weight`` with ``prune.<method>`` (jaxprune names: ``axis`` -> ``dim``); returns the mask."""
  if "axis" in kwargs:
    kwargs["dim"] = kwargs.pop("axis")
  getattr(tprune, method)(module, "weight", **kwargs)
  return (module.weight_mask.detach().float().numpy() != 0)


def channel_norms(t: torch.Tensor, n, axis: int) -> np.ndarray:
  dims = [d for d in range(t.dim()) if d != axis % t.dim()]
  return torch.norm(t, p=n, dim=dims).float().numpy()


def assert_same_up_to_ties(ours, theirs, scores, rtol=0.0):
  """Masks must be equal, except among entries whose scores torch sees as equal (spec §4: tie order is libstdc++'s).

  ``scores`` are the values torch ranked, aligned with the masks (entries, or channels for structured methods).
  """
  ours, theirs = np.asarray(ours, bool), np.asarray(theirs, bool)
  assert ours.shape == theirs.shape
  assert ours.sum() == theirs.sum(), f"kept {ours.sum()} entries, torch kept {theirs.sum()}"
  differ = ours != theirs
  if differ.any():
    s = np.asarray(scores, np.float64)[differ]
    ref = s[0]
    both_nan = np.isnan(s).all()
    assert both_nan or np.allclose(s, ref, rtol=rtol, atol=0), (
        f"masks differ at entries with different scores {s[:8]} (not a tie)")
