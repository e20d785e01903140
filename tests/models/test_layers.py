"""Shared output layers: CalciumELU1 against a plain numpy causal filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_sensorium.models import ELU1, CalciumELU1


def test_calcium_elu1_is_a_causal_convex_filter_of_elu1() -> None:
    x = torch.randn(2, 5, 17, generator=torch.Generator().manual_seed(0))
    layer = CalciumELU1(taps=4, offset=0.3)
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([0.5, -0.2, 1.0, -1.0]))
    w = torch.softmax(layer.logits.detach(), 0).numpy()
    assert w.sum() == pytest.approx(1.0)
    rate = ELU1(offset=0.3)(x).numpy()  # (2, 5, 17)
    expected = np.zeros_like(rate)
    for t in range(rate.shape[-1]):
        for lag in range(4):
            expected[..., t] += w[lag] * rate[..., max(t - lag, 0)]  # the first value before the trace starts
    out = layer(x)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (out > 0).all()
    # Causal: changing step 9 changes steps 9 … 12 only.
    changed = x.clone()
    changed[..., 9] += 1.0
    touched = torch.nonzero((layer(changed) - out).abs().amax(dim=(0, 1)) > 0).flatten().tolist()
    assert touched == [9, 10, 11, 12]
    (grad,) = torch.autograd.grad(out.sum() + (out**2).sum(), layer.logits)
    assert grad.abs().sum() > 0
    # One tap is ELU1; the initial kernel is close to it.
    assert torch.equal(CalciumELU1(taps=1)(x), ELU1()(x))
    assert CalciumELU1().kernel()[0] > 0.9
    with pytest.raises(ValueError, match="taps"):
        CalciumELU1(taps=0)
