"""Named training settings for `imaml-fast train`.

The Omniglot presets follow the iMAML paper's settings, 5 CG steps, 16 inner steps for 5-way
and 25 for 20-way, Adam as the outer optimizer, except lam (0.5 where the paper has 2). Where
the paper is silent we chose, where measurements said otherwise we departed from it, and say
why here (every measurement before the lam item's was made at lam 2):

- lam 0.5, not 2. With the presets' inner loop (16 or 25 gd_armijo steps of at most 0.03)
  the adapted parameters end far from the proximal minimiser: on the 5-way 1-shot run's
  meta-parameters after 4,000 steps at lam 2 the inner objective was 0.20 above its minimum,
  twenty times that minimum, the iterate having fitted the support set and then drifted back
  towards theta by only 1 - 0.03 lam = 0.94 per step. An inner solver that gets close to the
  minimiser ("agd", Nesterov momentum) trained far worse at lam 2 (74.57 +- 0.97% on 600
  meta-test tasks after 1,000 steps against 87.24 +- 0.74%): the proximal term at lam 2 holds
  the adaptation back, and results at lam 2 rest on the loop stopping early. With lam 0.5
  every measured preset trained faster from the first 50-100 steps on (CPU, 16 tasks, seed
  0; benchmarks/results/cpu-epyc-2core/inner_solvers/):
  5-way 1-shot 91.45 +- 0.59% after 1,000 steps and 94.06 +- 0.49% after 2,000, where lam 2
  had 87.24%, 90.45% and, after 4,000, 92.80%;
  20-way 1-shot 75.36 +- 0.46% after 500 steps against 68.06 +- 0.53% (and 73.77% after 800);
  5-way 5-shot 93% training accuracy over steps 81-100 against 89% (a 100-step check,
  results/cpu-epyc-2core/omniglot_5w5s/). 20-way 5-shot takes the same value unmeasured.
  agd at lam 0.5 trained about as well as gd_armijo (90.07 +- 0.66% after 1,000 5-way steps),
  at one loss evaluation more per step, so gd_armijo stays.
  Over 400 5-way 1-shot steps smaller was better (training accuracy over steps 301-400: lam
  2 84.3%, 1 88.1%, 0.5 88.7%, 0.25 89.1%), but over 2,000 steps lam 0.25 was level with
  0.5 (92.12 +- 0.59% and 94.29 +- 0.50% after 1,000 and 2,000 steps, against 91.45% and
  94.06%); 0.5 is kept because the proximal term is what keeps the implicit system well
  posed.
- inner solver "gd_armijo": the paper's proximal gradient steps (iMAML-GD), each kept only
  where it decreases the task's regularised support loss, a refused step halving that task's
  step size (imaml_fast.inner). With the fixed step ("gd") meta-training sharpens the support
  loss until the step no longer converges: on 20-way 1-shot the largest Hessian eigenvalue at
  the adapted parameters was at the fixed step's bound 2 / inner_lr - lam = 65 from the first
  meta-step and at 124-150 from step 41 on, where the inner loop ended with a larger
  gradient than it started from and nearly every task's CG stopped on negative curvature
  (benchmarks/inner_convergence.py, results/cpu-epyc-2core/inner_convergence/). The line
  search keeps the inner residual at 0.08-0.24 of its start while the eigenvalue grows as
  much. 5-way 1-shot trains faster with it (CPU, 16 tasks, seed 0: training
  accuracy after adaptation 82% / 87% / 89% over steps 201-400 / 401-600 / 801-1,000 where
  "gd" had 73% / 81% / 87%; 87.24 +- 0.74% on 600 meta-test tasks after 1,000 steps and
  90.45 +- 0.65% after 2,000, where "gd" reached 81.21% after 600 steps and 88.87% after
  2,000; 92.80 +- 0.55% after 4,000), and 20-way trains at all
  (below). Cost: 10% more per 5-way meta-step on the CPU (one more support gradient and a
  few passes over the parameters per inner step; benchmarks/bench_meta_step.py).
- inner_lr 0.03: with 0.1 (what the project's speed benchmarks use) the fixed-step inner
  gradient descent stops converging once meta-training sharpens the network: in a 600-step
  CPU run the support loss after adaptation rose from 0.1 to 3.0 and meta-test accuracy ended
  at 30%. With 0.03 (T = 8, 250 steps, same seed) the support loss stays near 0.06 and query
  accuracy after adaptation rises steadily (56% -> 73%) where 0.1 peaks at 66% and falls
  back. (Measured with "gd"; with the line search 0.03 is the largest step a task takes.)
  A cap of 0.1 with the line search: level on 5-way 5-shot after 500 steps (96.32 +- 0.35%
  against 96.20 +- 0.37%); on 20-way 5-shot it left the preset's 25 inner steps three times
  closer to the minimiser early in training (residual 0.20 against 0.59) and led training
  accuracy by 3.3 points over the first 40 steps, but as the inner problems became easier
  the 0.03 loops' residual fell to the same 0.04-0.06 and the lead to 0.2 points over steps
  81-100 (results/cpu-epyc-2core/inner_solvers/, sections 9-11).
- tasks per meta-batch 32 (5-way) and 16 (20-way, four times the images per task);
- 1 or 5 support images per class as the preset says, and 5 query images per class in
  training and evaluation: the query set only enters through one gradient, and 5 per class
  gives a steadier signal and steadier batch statistics than 1;
- outer Adam lr 1e-3 and 30,000 meta-steps: a full run; --steps trims it for a quick try;
- cg_damping 10 (5-way) in the implicit operator I + (H + 10 I) / lam, the size of the
  authors' code's lam_damping and the sinusoid preset's value (see below). For this network
  at initialisation it changes nothing that CG reports (no task stops on negative curvature
  with or without it, on real 5-way 1-shot episodes); it is kept because the Omniglot runs
  measured so far used it. --cg-damping 0 gives the paper's operator exactly (on 5-way it
  failed, below). What the damping does where the presets' inner loops
  end (benchmarks/inner_steps_probe.py --first-order on trained checkpoints): H is small
  against cg_damping I there, and the 5 CG steps return the first-order meta-gradient (the
  query gradient at phi) divided by 1 + cg_damping / lam, to cosine 0.997-1.000 (5-way at
  lam 0.5 and 2, 20-way with cg_damping 50). Adam ignores that constant scale, so the
  presets train as first-order runs (cg_steps 0) do, which measured level with them (5-way
  91.55% against 91.45% after 1,000 steps, 20-way 74.40% against 75.36% after 500). The
  presets keep the implicit solve: it is the method this library implements, and it costs
  nothing in accuracy; `--cg-steps 0` is the faster choice at the damped presets' settings.
  benchmarks/results/cpu-epyc-2core/inner_solvers/ (section 5) has the figures. Without
  damping at lam 0.5 (section 6 there) the Hessian term turned the gradient (mean per-task
  cosine 0.86-0.90) and paid on 20-way 1-shot: 82.57 +- 0.43% after 1,000 steps against
  80.90 +- 0.43% with cg_damping 50, CG meeting negative curvature in one task of 16 on 17
  steps of 1,000 (a second seed: 76.53% against 75.00% after 500 steps); on 5-way it
  failed from the start (a fifth to two fifths of the tasks' CG stopped on negative
  curvature; 78.85 +- 0.97% against 91.45 +- 0.59%). Continued to 2,000 steps the 20-way
  1-shot runs moved further apart, **87.16 +- 0.36% undamped against 84.48 +- 0.40%**, the
  undamped run ahead in training accuracy in every block and CG meeting negative curvature
  in at most one task of 16 on 5 of steps 1,001-2,000; so the omniglot-20w1s preset now uses
  the paper's operator, cg_damping 0 (below). The 5-way presets keep 10 (undamped they fail).
- 20-way: cg_damping 0 for 1-shot (the paper's operator; above: 87.16% against 84.48% with
  50 after 2,000 steps, seed 0, and 81.82% against 80.29% after 800 with seed 1), 50 for
  5-shot: undamped, its CG stopped on negative curvature on 29 of the first 40 steps (up to
  56% of a step's tasks) and it trailed damping 50 by 1.7-6.4 points of training accuracy in
  every block of 10 steps (results/cpu-epyc-2core/inner_solvers/, section 9). The history
  of 50, all at lam 2 except where said (with lam 0.5 the undamped operator no longer meets
  the failures below on 20-way 1-shot, and `imaml-fast train` warns, suggesting a larger
  --cg-damping, if it starts to): with the fixed-step inner loop no setting trained 20-way
  1-shot (query accuracy after adaptation peaked at 42-53% and fell back to about 40%, while most
  tasks' CG began to stop on negative curvature; first-order meta-gradients kept learning,
  38% -> 71% over 400 steps). With gd_armijo and cg_damping 10 it trains, 39% -> 67% over
  350 steps, but twice fell back for 50 steps (to 54% and, at step 400, 50%; 41.75 +- 0.56%
  on 600 meta-test tasks there), each time after the share of tasks whose CG stopped on
  negative curvature had risen to 15-40%: those tasks' meta-gradients, CG iterates that grew
  before the stop, dominate the mean. With gd_armijo and cg_damping 50 CG almost never stops
  so (0-2% of tasks) and training has not fallen back in 1,400 steps: 38% -> 84%, 80.53 +-
  0.43% on 600 meta-test tasks, where the best fixed-step run scored 31.21%; first-order
  meta-gradients reached 80.11 +- 0.44% at the same step (they led between steps 301 and 700),
  and whether the implicit gradient pulls ahead later needs longer runs. cg_damping 10 with
  cg_clip (each task's solution cut to the length a minimiser allows) did not collapse and led
  cg_damping 50 until step 300 (71% against 69%), but then most tasks' CG met negative
  curvature and it fell behind: the sharper network it trained needed about 100 inner steps
  where 25 left the inner loops partway down (benchmarks/inner_steps_probe.py); so 50 stayed,
  without the clip. Larger damping weighs
  the Hessian term less (the operator is proportional to I + H / (lam + damping)); the
  authors' code's operator is about I + H / 24. All on the CPU with 16 tasks per step and seed 0
  (benchmarks/results/cpu-epyc-2core/omniglot_gd_armijo/ and omniglot_20w1s/). The 20-way
  5-shot preset keeps 50; a first check, 60 steps at lam 2, rose from 59% to 78%
  (benchmarks/results/cpu-epyc-2core/omniglot_20w5s/).
  `imaml-fast train` warns when most tasks' CG keeps stopping on negative curvature.

The sinusoid preset (MAML's regression problem on the 1-40-40-1 network) is the data-free
default: 1,000 meta-steps of 10 tasks finish in under a minute on a CPU. Its squared-error
Hessians have large negative eigenvalues (a product of weights times a residual of up to
amplitude 5): with lam = 2 and no damping, CG flags negative curvature in 60% of the tasks
and the meta-loss stalls near 4. cg_damping = 10 (the same size as the iMAML authors'
lam_damping) keeps the implicit system positive definite: over 300 meta-steps the query MSE
after adaptation falls from 5.3 to 1.8 where lam = 2 alone reaches 2.6. (Those runs used the
fixed step.) Its inner solver is gd_armijo too: with the fixed step the query MSE was best
(1.40-1.47) near step 500 and rose again, and with seed 1 the inner loop diverged from step
~620 (support MSE 1e3, then 1e14 and beyond); with the line search it kept falling, to
0.65-0.82 over steps 601-1,000 with both seeds
(benchmarks/results/cpu-epyc-2core/sinusoid_gd_armijo/).
"""
from __future__ import annotations


def _omniglot(n_way: int, k_shot: int) -> dict:
    return dict(task="omniglot", n_way=n_way, k_shot=k_shot, q_query=5,
                tasks=32 if n_way == 5 else 16, steps=30000, inner_solver="gd_armijo",
                inner_steps=16 if n_way == 5 else 25, inner_lr=0.03,
                lam=0.5, cg_steps=5,
                cg_damping=10.0 if n_way == 5 else (0.0 if k_shot == 1 else 50.0),
                outer_lr=1e-3)


PRESETS = {
    "sinusoid": dict(task="sinusoid", n_way=1, k_shot=10, q_query=10, tasks=10, steps=1000,
                     inner_solver="gd_armijo", inner_steps=10, inner_lr=0.02, lam=2.0, cg_steps=5,
                     cg_damping=10.0, outer_lr=1e-3),
    **{f"omniglot-{n}w{k}s": _omniglot(n, k) for n in (5, 20) for k in (1, 5)},
}
