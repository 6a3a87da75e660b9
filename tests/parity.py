"""Parity with transformers at the precision float32 allows.

Two float32 forwards of one network, ours in XLA and transformers' in PyTorch, differ by rounding
that grows with depth and with the logits' scale: on SmolLM2's 30 layers about 1e-4 on logits up to
38, more than any fixed `atol` that would still catch a wrong weight on a 3-layer model. So no
parity test here uses one. Each runs transformers' model once more in float64 (rounding ~1e-13)
and asks that our float32 error against that exact answer be within a small multiple of
transformers' own float32 error, eager and sdpa attention, on the same inputs in the same test:

    max |ours - exact| <= MAX_FACTOR * max_impl max |theirs_f32 - exact|
    rms (ours - exact) <= RMS_FACTOR * max_impl rms (theirs_f32 - exact)

On SmolLM2 (2026-12-03): ours 8.1e-5 max / 1.46e-5 rms, transformers' sdpa 9.3e-5 / 1.62e-5 and
eager 1.06e-4 / 1.61e-5. A wrong weight is three orders of magnitude above that:
tests/test_model_parity.py::test_parity_check_fails_on_wrong_weights swaps two rows of one layer's
projection, or scales one matrix by 1.01, and shows the check failing on a tiny model and on
SmolLM2. Every parity test against transformers (loading, export, GGUF, the discriminator) goes
through `assert_f32_parity`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import torch

MAX_FACTOR = 8.0
RMS_FACTOR = 3.0
_EPS32 = float(np.finfo(np.float32).eps)


@dataclasses.dataclass(frozen=True)
class Reference:
  """transformers' outputs in float64, and how far its own float32 forwards are from them."""

  exact: np.ndarray  # float64
  f32: np.ndarray  # transformers' float32 output (sdpa attention), for comparisons in float32
  f32_max: float
  f32_rms: float


def hf_reference(
  model: torch.nn.Module,
  forward: Callable[[torch.nn.Module], torch.Tensor],
  mask: np.ndarray | None = None,
) -> Reference:
  """Runs `forward(m)` on `model` in float32 (eager and sdpa attention) and on a float64 copy.

  `mask` selects the entries that count (e.g. the real, unpadded positions of logits [B, T, V]).
  """
  pick = (lambda x: x) if mask is None else (lambda x: x[mask])
  outs = {}
  for impl in ("eager", "sdpa"):
    model.set_attn_implementation(impl)
    with torch.no_grad():
      outs[impl] = forward(model.eval()).float().numpy()
  exact_model = copy.deepcopy(model).double().eval()
  exact_model.set_attn_implementation("sdpa")  # eager in float64 masks with -inf rows into NaN
  with torch.no_grad():
    exact = forward(exact_model).numpy()
  assert np.isfinite(pick(exact)).all(), "float64 reference is not finite"
  errs = [np.abs(pick(v).astype(np.float64) - pick(exact)) for v in outs.values()]
  return Reference(
    exact=exact,
    f32=outs["sdpa"],
    f32_max=max(float(e.max()) for e in errs),
    f32_rms=max(float(np.sqrt((e**2).mean())) for e in errs),
  )


def f32_error(
  ours: np.ndarray, ref: Reference, mask: np.ndarray | None = None
) -> tuple[float, float]:
  """(max, rms) of |ours - exact| over the entries `mask` selects."""
  pick = (lambda x: x) if mask is None else (lambda x: x[mask])
  err = np.abs(pick(np.asarray(ours, np.float64)) - pick(ref.exact))
  return float(err.max()), float(np.sqrt((err**2).mean()))


def assert_f32_parity(ours: np.ndarray, ref: Reference, mask: np.ndarray | None = None) -> None:
  """Fails unless our float32 output is as close to the exact answer as transformers' own."""
  pick = (lambda x: x) if mask is None else (lambda x: x[mask])
  assert np.shape(ours) == np.shape(ref.exact), (np.shape(ours), np.shape(ref.exact))
  err_max, err_rms = f32_error(ours, ref, mask)
  # A floor of a few ulps of the output's scale, for outputs transformers happens to get exact.
  floor = 4 * _EPS32 * float(np.abs(pick(ref.exact)).max())
  max_bound = MAX_FACTOR * max(ref.f32_max, floor)
  rms_bound = RMS_FACTOR * max(ref.f32_rms, floor / 4)
  assert err_max <= max_bound and err_rms <= rms_bound, (
    f"not float32 parity: ours vs float64 max {err_max:.3g} (bound {max_bound:.3g}), "
    f"rms {err_rms:.3g} (bound {rms_bound:.3g}); transformers' own float32 error "
    f"max {ref.f32_max:.3g}, rms {ref.f32_rms:.3g}"
  )
