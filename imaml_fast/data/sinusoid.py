"""Sinusoid regression tasks as in MAML (Finn et al. 2017, section 5.1).

Task i: y = A_i sin(x - phase_i) with the amplitude A_i uniform in [0.1, 5] and the phase
uniform in [0, pi]; x uniform in [-5, 5]. K support and Q query points per task, T tasks per
call, x and y of shape [T, K, 1] and [T, Q, 1] (one input feature, one target: what
models.sinusoid_mlp takes). The amplitudes and phases come back too, so a test or a plot can
recompute the targets exactly.

The random numbers are drawn in float64 on the sampler's own CPU generator and only then cast
and moved, so a seed gives the same tasks on every device and in every dtype (up to that final
rounding); y is computed on the device, in `dtype`, as amplitude * sin(x - phase).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch


@dataclass
class SinusoidEpisode:
    """x_support, y_support [T, K, 1]; x_query, y_query [T, Q, 1]; amplitude, phase [T].
    Unpacks as `xs, ys, xq, yq = sampler.sample()`."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor

    def __iter__(self):
        return iter((self.x_support, self.y_support, self.x_query, self.y_query))


def _range(name: str, value) -> Tuple[float, float]:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in value) and value[0] <= value[1])
    if not ok:
        raise ValueError(f"SinusoidSampler: {name}={value!r} is invalid: expected a pair "
                         f"(low, high) of finite numbers with low <= high")
    return float(value[0]), float(value[1])


class SinusoidSampler:
    """T sinusoid tasks per sample(), K support and Q query points each, seeded.

    amplitude, phase, x_range: the (low, high) of the uniform draws, MAML's by default.
    device, dtype: where and in which floating dtype the tensors are returned.
    """

    def __init__(self, k_shot: int, q_query: int, tasks: int, *, amplitude=(0.1, 5.0),
                 phase=(0.0, math.pi), x_range=(-5.0, 5.0), device="cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0):
        for name, value, minimum in (("k_shot", k_shot, 1), ("q_query", q_query, 1),
                                     ("tasks", tasks, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"SinusoidSampler: {name}={value!r} is invalid: expected an "
                                 f"int >= {minimum}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"SinusoidSampler: dtype={dtype!r} is invalid: use a floating dtype")
        self.k_shot, self.q_query, self.tasks, self.seed = k_shot, q_query, tasks, seed
        self.amplitude, self.phase = _range("amplitude", amplitude), _range("phase", phase)
        self.x_range = _range("x_range", x_range)
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def _uniform(self, bounds: Tuple[float, float], *shape: int) -> torch.Tensor:
        lo, hi = bounds
        u = torch.rand(*shape, generator=self.generator, dtype=torch.float64)
        return (lo + (hi - lo) * u).to(device=self.device, dtype=self.dtype)

    def sample(self) -> SinusoidEpisode:
        T, K, Q = self.tasks, self.k_shot, self.q_query
        amp = self._uniform(self.amplitude, T)
        phase = self._uniform(self.phase, T)
        x = self._uniform(self.x_range, T, K + Q, 1)
        y = amp.view(T, 1, 1) * torch.sin(x - phase.view(T, 1, 1))
        return SinusoidEpisode(x[:, :K].contiguous(), y[:, :K].contiguous(), x[:, K:].contiguous(),
                               y[:, K:].contiguous(), amp, phase)

    def __iter__(self) -> Iterator[SinusoidEpisode]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "generator" not in state:
            raise ValueError("SinusoidSampler.load_state_dict needs the dict state_dict() "
                             "returned")
        self.generator.set_state(state["generator"])
