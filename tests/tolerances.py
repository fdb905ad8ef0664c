"""Tolerances of the kernel tests, stated against float64 rather than tuned on one processor: a result is close
enough when its error against the float64 computation is within a few times that of PyTorch's own fp32 path."""

from __future__ import annotations

import torch


def float64_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest absolute difference of ``got`` from the float64 ``exact`` result."""
    return (got.double() - exact.double()).abs().max().item()


def close_to_float64(got: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, factor: float = 4.0,
                     what: str = "") -> None:
    """Assert that ``got`` is within ``factor`` times the fp32 ``reference``'s own error against the float64 ``exact``
    result, plus a floor of 16 float32 rounding steps at the result's scale (``16 * 2**-23 * max|exact|``, 2e-6
    relative): a reference that sums in a cascade (a bias gradient, a norm's statistics) can be closer to float64
    than one rounding per term, while a wrong result is off by orders of magnitude more."""
    assert got.shape == exact.shape, (what, got.shape, exact.shape)
    allowed = factor * float64_error(reference, exact) + 16 * 2**-23 * exact.abs().max().item()
    error = float64_error(got, exact)
    assert error <= allowed, f"{what}: error {error:.3g} against float64, allowed {allowed:.3g}"
