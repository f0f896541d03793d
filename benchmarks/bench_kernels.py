"""GPU timing of the csrc CUDA kernels against the PyTorch references (and the Triton
kernels when they import), with CUDA events; a prepared script for the GPU check.

    python benchmarks/bench_kernels.py [--out results.md]
    python benchmarks/bench_kernels.py --cpu-dry-run   # checks this script on a CPU

For each op: median milliseconds over repeats after warm-up, the bytes the op must move,
the effective bandwidth, and that bandwidth as a fraction of a device-to-device copy measured
in the same run (the ceiling for these bandwidth-bound vector ops). Prints a markdown table.
"""
import argparse
import statistics
import sys
import time

import torch

DRY = "--cpu-dry-run" in sys.argv


def timed(fn, reps=50, warmup=10, setup=None):
    """Median ms of fn(*setup()) (setup runs outside the timed region)."""
    if DRY:  # wall clock on the CPU twin, few repeats
        times = []
        for _ in range(3):
            args = setup() if setup else ()
            t0 = time.perf_counter()
            fn(*args)
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    for _ in range(warmup):
        fn(*(setup() if setup else ()))
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        args = setup() if setup else ()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*args)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def captured(fn):
    """fn captured as a CUDA graph (after two warm-up calls on a side stream); returns the
    replay callable."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-dry-run", action="store_true")
    args = ap.parse_args()
    if not DRY and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from imaml_fast import _ext
    from imaml_fast.backends import cpp as cpu_twin
    from imaml_fast.backends import cuda as cu
    from imaml_fast.cg import batched_dot, cg_update_ref
    from imaml_fast.dense import dense_cg_ref
    from imaml_fast.inner import prox_update_ref

    be, dev = (cpu_twin, torch.device("cpu")) if DRY else (cu, torch.device("cuda"))
    why = be.why_not(dev, torch.float32)
    if why:
        sys.exit(f"backend cannot run: {why}")
    ops = be.load_ops()
    tops = {}
    if not DRY:
        try:
            from imaml_fast.backends import triton as tb  # the Triton backend, when present
            tops = tb.load_ops() if not tb.why_not(dev, torch.float32) else {}
        except Exception as e:  # noqa: BLE001 - an optional peer
            print(f"(no triton comparison: {e})")
    name = "cpu (dry run)" if DRY else torch.cuda.get_device_name(dev)
    lines = [f"device: {name}; torch {torch.__version__}; build: {_ext.build_info()}", "",
             "| op | dtype | T x P | impl | ms | GB/s | of copy |", "|---|---|---|---|---:|---:|---:|"]

    big = torch.empty((1 << 20) if DRY else (256 << 20), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_ms = timed(lambda: dst.copy_(big), reps=20)
    copy_bw = 2 * big.numel() / copy_ms / 1e6
    lines.insert(1, f"device-to-device copy: {copy_bw:.0f} GB/s (bytes read + written)")

    def row(op, dtype, shape, impl, ms, nbytes):
        bw = nbytes / ms / 1e6
        lines.append(f"| {op} | {str(dtype)[6:]} | {shape} | {impl} | {ms:.4f} | {bw:.0f} | "
                     f"{bw / copy_bw:.0%} |")

    for dtype in (torch.float32,) if DRY else (torch.float32, torch.bfloat16):
        for T, P in ((4, 1000),) if DRY else ((32, 113_000), (32, 1_000_000)):
            e = torch.tensor([], dtype=dtype).element_size()
            b = torch.randn(T, P, device=dev).to(dtype)
            acc = torch.float32 if dtype != torch.float64 else dtype

            def state():
                x = torch.zeros_like(b)
                r, p = b.clone(), b.clone()
                Ap = (2 * p.float() + 0.1).to(dtype)
                rs = batched_dot(r, r)
                return [x, r, p, Ap, rs, torch.zeros(T, dtype=torch.int8, device=dev),
                        torch.zeros(T, dtype=torch.long, device=dev), (1e-20 * rs).to(acc)]

            s0 = state()
            shape = f"{T} x {P}"
            impls = [("cuda", ops["cg_update"]), ("torch ref", cg_update_ref)]
            if "cg_update" in tops:
                impls.append(("triton", tops["cg_update"]))
            for impl, fn in impls:
                # a fresh copy of the same running state each time: every call does full work
                ms = timed(fn, setup=lambda: [v.clone() for v in s0])
                row("cg_update", dtype, shape, impl, ms, 10 * T * P * e)
            theta = torch.randn(P, device=dev).to(dtype)
            impls = [("cuda", ops["prox_update"]), ("torch ref", prox_update_ref)]
            if "prox_update" in tops:
                impls.append(("triton", tops["prox_update"]))
            for impl, fn in impls:
                ms = timed(lambda: fn(b, s0[3], theta, 0.1, 2.0))
                row("prox_update", dtype, shape, impl, ms, 3 * T * P * e)
            for impl, fn in (("cuda", ops["batched_dot"]), ("torch ref", batched_dot)):
                ms = timed(lambda: fn(b, s0[3]))
                row("batched_dot", dtype, shape, impl, ms, 2 * T * P * e)

    # The dense kernel runs one block per task; the PyTorch reference is a matrix-free CG loop
    # of small launches, so it is also timed as a captured CUDA graph (what IMAML replays on a
    # GPU by default). Four sizes, to find where the kernel stops paying.
    for T, P in ((2, 50),) if DRY else ((32, 256), (32, 512), (32, 1024), (32, 1761)):
        H = torch.randn(T, P, P, device=dev) / P ** 0.5
        H = H @ H.transpose(1, 2)
        bb = torch.randn(T, P, device=dev)
        for impl, fn in (("cuda", ops["dense_cg"]), ("torch ref", dense_cg_ref)):
            ms = timed(lambda: fn(H, bb, 1.0, 0.5, 5, 1e-10), reps=20)
            row("dense_cg (5 it)", torch.float32, f"{T} x {P}", impl, ms, 5 * T * P * P * 4)
        if not DRY:
            try:
                replay = captured(lambda: dense_cg_ref(H, bb, 1.0, 0.5, 5, 1e-10))
                ms = timed(replay, reps=20)
                row("dense_cg (5 it)", torch.float32, f"{T} x {P}", "torch ref, CUDA graph", ms,
                    5 * T * P * P * 4)
            except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                print(f"(dense_cg_ref could not be captured: {type(e).__name__}: {e})")
        if "dense_cg" in tops:
            ms = timed(lambda: tops["dense_cg"](H, bb, 1.0, 0.5, 5, 1e-10), reps=20)
            row("dense_cg (5 it)", torch.float32, f"{T} x {P}", "triton", ms, 5 * T * P * P * 4)

    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
