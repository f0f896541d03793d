"""MAML's sinusoid regression tasks."""
import math

import pytest
import torch

from imaml_fast.data import SinusoidSampler


def test_shapes_ranges_and_exact_targets():
    T, K, Q = 64, 10, 7
    s = SinusoidSampler(K, Q, T, seed=0)
    ep = s.sample()
    assert ep.x_support.shape == ep.y_support.shape == (T, K, 1)
    assert ep.x_query.shape == ep.y_query.shape == (T, Q, 1)
    assert ep.amplitude.shape == ep.phase.shape == (T,)
    assert all(t.dtype == torch.float32 for t in (*ep, ep.amplitude, ep.phase))
    assert 0.1 <= ep.amplitude.min() and ep.amplitude.max() <= 5.0
    assert 0.0 <= ep.phase.min() and ep.phase.max() <= math.pi
    for x in (ep.x_support, ep.x_query):
        assert -5.0 <= x.min() and x.max() <= 5.0
    for x, y in ((ep.x_support, ep.y_support), (ep.x_query, ep.y_query)):
        assert torch.equal(y, ep.amplitude[:, None, None] * torch.sin(x - ep.phase[:, None, None]))
        # and to float64 rounding, the formula itself (not, say, sin(x + phase))
        amp, phase = ep.amplitude.double()[:, None, None], ep.phase.double()[:, None, None]
        ref = amp * torch.sin(x.double() - phase)
        assert torch.allclose(y.double(), ref, atol=1e-5)
    # the draws spread over their ranges, and the tasks differ
    assert ep.amplitude.max() - ep.amplitude.min() > 3 and ep.phase.std() > 0.5
    assert torch.cat([ep.x_support, ep.x_query], 1).std() > 2


def test_reproducible_resumable_and_seed_dependent():
    a, b, c = SinusoidSampler(5, 5, 4, seed=1), SinusoidSampler(5, 5, 4, seed=1), \
        SinusoidSampler(5, 5, 4, seed=2)
    ea, eb, ec = a.sample(), b.sample(), c.sample()
    assert torch.equal(ea.x_support, eb.x_support) and torch.equal(ea.phase, eb.phase)
    assert not torch.equal(ea.amplitude, ec.amplitude)
    state = a.state_dict()
    nxt = a.sample()
    assert not torch.equal(nxt.x_query, ea.x_query)
    c.load_state_dict(state)
    assert torch.equal(c.sample().y_query, nxt.y_query)


def test_float64_gives_the_same_tasks():
    e32 = SinusoidSampler(3, 3, 5, seed=7).sample()
    e64 = SinusoidSampler(3, 3, 5, seed=7, dtype=torch.float64).sample()
    assert e64.y_query.dtype == torch.float64
    assert torch.equal(e64.amplitude.float(), e32.amplitude)
    assert torch.equal(e64.x_support.float(), e32.x_support)


def test_custom_ranges_and_bad_arguments():
    ep = SinusoidSampler(4, 4, 8, amplitude=(1.0, 1.0), phase=(0.0, 0.0), seed=0).sample()
    assert torch.equal(ep.y_support, torch.sin(ep.x_support))
    with pytest.raises(ValueError, match="k_shot=0"):
        SinusoidSampler(0, 1, 1)
    with pytest.raises(ValueError, match=r"amplitude=\(5, 1\) is invalid"):
        SinusoidSampler(1, 1, 1, amplitude=(5, 1))
    with pytest.raises(ValueError, match="dtype"):
        SinusoidSampler(1, 1, 1, dtype=torch.int64)
