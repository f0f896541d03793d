"""betty's implicit-differentiation (CG) iMAML, called as the installed package (betty-ml).

The pattern of betty's own iMAML example (examples/implicit_maml/main.py), run through its
Engine: an Outer ImplicitProblem (the query loss, gradient accumulation over the T tasks of a
meta-batch) above an Inner ImplicitProblem (support loss + lam/2 ||params - outer params||^2,
torch.optim.SGD, `inner_steps` unrolled steps, reset to the outer parameters at the start of
each task). The example's hypergradient is "darts"; here the Inner config is type="cg" with
cg_iterations = Settings.cg_steps and cg_alpha = 1, betty's implicit CG. The Outer problem's
custom_optimizer_step records the accumulated meta-gradient instead of stepping, so every
call computes a meta-gradient at the same meta-parameters, like the other implementations.

betty's CG (betty/hypergradient/cg.py in 0.1.1) has no tolerance and builds the next search
direction from the previous residual (p_new = r + beta p, not r_new + beta p): from the second
iteration on it is not conjugate gradient, and its result differs from the exact solve
(benchmarks/grad_accuracy.py measures by how much).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .common import Result, Settings, flat

INSTALL = "pip install betty-ml==0.1.1   (its metadata has non-standard specifiers: pip < 24.1)"


def why_not() -> Optional[str]:
    try:
        import betty.engine  # noqa: F401
        import betty.problems  # noqa: F401
    except Exception as e:
        return f"betty is not available ({type(e).__name__}: {e}): {INSTALL}"
    return None


def build(model: torch.nn.Module, loss_fn, s: Settings):
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    lam, steps = s.lam, s.inner_steps
    state = {"task": -1, "data": None, "grad": None, "phi": []}

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return loss_fn(self.inner(x), y)

        def get_batch(self):
            _, _, xq, yq = state["data"]
            return xq[state["task"]], yq[state["task"]]

        def custom_optimizer_step(self, *args, **kwargs):
            state["grad"] = flat(p.grad if p.grad is not None else torch.zeros_like(p)
                                 for p in self.trainable_parameters())

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            reg = 0
            for p1, p2 in zip(self.parameters(), self.outer.parameters()):
                reg = reg + torch.sum(torch.pow(p1 - p2, 2))
            return loss_fn(self.module(x), y) + 0.5 * lam * reg

        def get_batch(self):
            xs, ys, _, _ = state["data"]
            return xs[state["task"]], ys[state["task"]]

        def on_inner_loop_start(self):
            if state["task"] >= 0:  # the adapted parameters of the task just finished
                state["phi"].append(flat(self.module.parameters()))
            state["task"] += 1
            self.module.load_state_dict(self.outer.module.state_dict())

    inner_module = copy.deepcopy(model)
    engines = {}

    def engine_for(T):
        if T not in engines:
            outer = Outer(name="outer", module=model,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                          config=Config(retain_graph=True, gradient_accumulation=T))
            inner = Inner(name="inner", module=inner_module,
                          optimizer=torch.optim.SGD(inner_module.parameters(), lr=s.inner_lr),
                          config=Config(type="cg", cg_iterations=s.cg_steps, cg_alpha=1.0,
                                        unroll_steps=steps))
            deps = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
            engines[T] = Engine(config=EngineConfig(train_iters=10 ** 9, valid_step=10 ** 9),
                                problems=[outer, inner], dependencies=deps)
        return engines[T]

    def run(xs, ys, xq, yq) -> Result:
        T = xs.shape[0]
        engine = engine_for(T)
        state.update(task=-1, data=(xs, ys, xq, yq), grad=None, phi=[])
        for _ in range(T * steps):  # what Engine.run() does per iteration, minus validation
            engine.global_step += 1
            engine.train_step()
        state["phi"].append(flat(inner_module.parameters()))
        if state["grad"] is None:
            raise RuntimeError("betty did not reach the outer step: check its configuration")
        return Result(grad=state["grad"], phi=torch.stack(state["phi"]),
                      info={"hypergradient": "betty.hypergradient.cg"})

    return run
