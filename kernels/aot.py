"""Compile every Triton kernel ahead of time for given GPU architectures, without a GPU.

    python -m imaml_fast.kernels.aot --arch 80 90

Produces PTX and cubin (with the ptxas that ships with triton) for each kernel in each dtype
it is used with, and fails on the first kernel that does not compile. The interpreter
(TRITON_INTERPRET=1) accepts programs that the compiler rejects, so this is the check that
the kernels build for real GPUs on a machine that has none. Run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def cases():
    from . import batch_norm, cg, dense, vector

    out = []
    for dt in ("fp32", "fp64", "bf16"):
        acc = "fp64" if dt == "fp64" else "fp32"
        out += [
            (vector._prox_update_kernel, {"phi_ptr": f"*{dt}", "g_ptr": f"*{dt}", "theta_ptr": f"*{dt}",
             "out_ptr": f"*{dt}", "coef_ptr": f"*{acc}", "P": "i32"},
             {"THETA_PER_TASK": True, "BLOCK": vector.BLOCK}),
            (vector._dot_partial_kernel, {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "part_ptr": f"*{acc}",
             "P": "i32", "NB": "i32"}, {"BLOCK": vector.BLOCK}),
            (cg._cg_dots_kernel, {"p_ptr": f"*{dt}", "ap_ptr": f"*{dt}", "r_ptr": f"*{dt}",
             "part_ptr": f"*{acc}", "T": "i32", "P": "i32", "NB": "i32"}, {"BLOCK": cg.BLOCK}),
            (cg._cg_update_kernel, {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", "p_ptr": f"*{dt}",
             "ap_ptr": f"*{dt}", "rs_ptr": f"*{acc}", "status_ptr": "*i8", "iters_ptr": "*i64",
             "part_ptr": f"*{acc}", "rr_ptr": f"*{acc}", "T": "i32", "P": "i32", "NB": "i32"},
             {"NB_POW": 128, "BLOCK": cg.BLOCK}),
        ]
    for acc in ("fp32", "fp64"):
        out += [
            (cg._cg_finish_kernel, {"rs_ptr": f"*{acc}", "thresh_ptr": f"*{acc}", "status_ptr": "*i8",
             "iters_ptr": "*i64", "part_ptr": f"*{acc}", "rr_ptr": f"*{acc}", "T": "i32", "NB": "i32"},
             {"NB_POW": 128}),
            (dense._dense_cg_kernel, {"H_ptr": f"*{acc}", "b_ptr": f"*{acc}", "ws_ptr": f"*{acc}",
             "iters_ptr": "*i64", "res_ptr": f"*{acc}", "status_ptr": "*i8", "coef_ptr": f"*{acc}",
             "P": "i32", "max_iter": "i32"}, {"ROWS": 16, "BLOCK": 128}),
            (batch_norm._bn_double_backward_kernel,
             {**{f"{n}_ptr": f"*{acc}" for n in ("a", "b", "c", "gy", "x", "mean", "invstd", "w",
                                                   "dgy", "dx", "dw")},
              "C": "i32", "S": "i32", "M": "i32"},
             {"HAS_A": True, "HAS_B": True, "HAS_C": True, "HAS_W": True,
              "BLOCK": batch_norm.BLOCK}),
        ]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile every Triton kernel for GPU targets")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: it routes compilation through the interpreter", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for arch in args.arch:
        for fn, sig, consts in cases():
            t0 = time.perf_counter()
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                            constexprs=consts)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            dtype = sig[next(iter(sig))].lstrip("*")
            print(f"compiled {fn.__name__} {dtype} sm_{arch}: {len(k.asm['cubin'])} B cubin, "
                  f"{time.perf_counter() - t0:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
