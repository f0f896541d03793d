"""How fast the engine's per-task convolutions run, against what bounds them on this CPU.

A CPU meta-step of the paper's Omniglot network is mostly its convolutions (about 70% on two
threads), and the batched engine runs each as ONE grouped convolution with the T tasks as
groups. This times, per layer of the authors' network and per pass:
- forward, weight gradient and input gradient as the engine runs them: ATen on the grouped
  convolution (the input gradient also by the cpp backend's kernel, where it applies);
- the same arithmetic with shared weights (one convolution over all T*N images): what the
  compute floor of benchmarks/floor.py runs;
- a GEMM bound: ATen's batched matrix product (torch.bmm) on the patch matrix already built
  (forward W_t cols_t, weight gradient gy_t cols_t^T, per task), i.e. the same FLOPs at the
  rate of ATen's own matrix-multiply kernels for these shapes with im2col for free;
- building that patch matrix with F.unfold, and this machine's matrix-multiply rate on a
  large square product.
If the grouped convolutions already run near the GEMM bound, a faster step needs a faster
matrix product than ATen's, not a different formulation.

    python benchmarks/conv_rates.py [--threads 1 2] [--n-way 5 20] [--malloc keep]
        [--json benchmarks/results/cpu-epyc-2core/conv_rates.json]

--malloc keep (the default) runs with keep_freed_cpu_memory(), so that the times are the
arithmetic's and not the page faults of freshly mapped outputs; --malloc default keeps glibc's
settings (then an output above glibc's mapping threshold is mapped anew on every call: the
20-way layer-1 output is 32 MB).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from floor import matmul_gflops  # benchmarks/floor.py
from peers.common import meta_line, run_meta, write_results

T = 32
# the authors' Omniglot network: (input channels, input size) of its four 3x3 stride-2 convs
LAYERS = [(1, 28), (64, 14), (64, 8), (64, 4)]
FILTERS, K, STRIDE, PAD = 64, 3, 2, 1


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _backward(gy, x, w, groups, mask):
    return torch.ops.aten.convolution_backward(gy, x, w, None, [STRIDE] * 2, [PAD] * 2, [1, 1],
                                               False, [0, 0], groups, mask)


def _check_gemm_forms(x, w, y, gy, cols, gyt, wt, n, c, h, ho):
    """The GEMM bound is only a bound if the products compute what the convolution does:
    check the three against ATen before timing them (float32 rounding: 1e-4 relative)."""
    def close(a, b, what):
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        if not err < 1e-4:
            raise AssertionError(f"conv_rates: the GEMM form of the {what} differs from ATen's "
                                 f"by {err:.1e} (relative): the bound would not be one")

    so = ho * ho
    fwd = torch.bmm(wt, cols).view(T, FILTERS, n, so).permute(2, 0, 1, 3)
    close(fwd.reshape(y.shape), y, "forward")
    gx_ref, gw_ref, _ = _backward(gy, x, w, T, [True, True, False])
    close(torch.bmm(gyt, cols.transpose(1, 2)).view(gw_ref.shape), gw_ref, "weight gradient")
    gcols = torch.bmm(wt.transpose(1, 2), gyt).view(T, c * K * K, n, so).permute(2, 0, 1, 3)
    gx = F.fold(gcols.reshape(n * T, c * K * K, so), (h, h), K, padding=PAD, stride=STRIDE)
    close(gx.view(gx_ref.shape), gx_ref, "input gradient (with col2im)")


def layer_rates(n: int, c: int, h: int, repeats: int, kernel=None) -> dict:
    """ms per call of every variant for one layer: n images per task, c input channels."""
    x = torch.randn(n, T * c, h, h)
    w = torch.randn(T * FILTERS, c, K, K)
    y = F.conv2d(x, w, None, STRIDE, PAD, 1, T)
    gy = torch.randn_like(y)
    ho = y.shape[-1]
    so, r = ho * ho, c * K * K
    # shared weights: all T*n images through one task's filters
    xs, ws = x.view(n * T, c, h, h), w[:FILTERS].contiguous()
    gys = torch.randn(n * T, FILTERS, ho, ho)
    # the patch matrix per task [T, c*K*K, n*so] and gy per task [T, FILTERS, n*so]
    unfold = lambda: F.unfold(xs, K, padding=PAD, stride=STRIDE)  # noqa: E731
    cols = unfold().view(n, T, r, so).permute(1, 2, 0, 3).reshape(T, r, n * so).contiguous()
    gyt = gy.view(n, T, FILTERS, so).permute(1, 2, 0, 3).reshape(T, FILTERS, n * so).contiguous()
    wt = w.view(T, FILTERS, r)
    colsT = cols.transpose(1, 2)
    _check_gemm_forms(x, w, y, gy, cols, gyt, wt, n, c, h, ho)
    t = {
        "fwd": _time(lambda: F.conv2d(x, w, None, STRIDE, PAD, 1, T), repeats),
        "fwd_shared": _time(lambda: F.conv2d(xs, ws, None, STRIDE, PAD), repeats),
        "fwd_gemm": _time(lambda: torch.bmm(wt, cols), repeats),
        "wgrad": _time(lambda: _backward(gy, x, w, T, [False, True, False]), repeats),
        "wgrad_shared": _time(lambda: _backward(gys, xs, ws, 1, [False, True, False]), repeats),
        "wgrad_gemm": _time(lambda: torch.bmm(gyt, colsT), repeats),
        "unfold": _time(unfold, repeats),
    }
    if c > 1:  # the first layer's input is the data: no input gradient
        t["igrad"] = _time(lambda: _backward(gy, x, w, T, [True, False, False]), repeats)
        t["igrad_shared"] = _time(lambda: _backward(gys, xs, ws, 1, [True, False, False]),
                                  repeats)
        # the input gradient as a product: cols-shaped W_t^T gy_t (col2im not included)
        t["igrad_gemm"] = _time(lambda: torch.bmm(wt.transpose(1, 2), gyt), repeats)
        if kernel is not None and kernel.applies(x, w, (STRIDE, STRIDE), T):
            t["igrad_kernel"] = _time(lambda: kernel(gy, x, w, (STRIDE,) * 2, (PAD,) * 2,
                                                     (1, 1), T), repeats)
    return {"n": n, "c": c, "h": h, "gflop": 2 * n * T * FILTERS * r * so / 1e9,
            "ms": {k: v * 1e3 for k, v in t.items()}}


def _cell(row, key):
    ms = row["ms"].get(key)
    if ms is None:
        return "-"
    return f"{ms:.2f} ({row['gflop'] / ms * 1e3:.0f})"


def markdown(meta, blocks) -> str:
    out = [f"{meta_line(meta)}; CPU allocator: {meta['settings']['malloc']}\n",
           f"Per-task convolutions of the authors' Omniglot network (3x3, stride 2, 64 filters), "
           f"T = {T} tasks as groups, N = n-way support images per task; ms per call "
           f"(GFLOP/s), median of {meta['settings']['repeats']}. *grouped*: as the engine runs "
           f"them (ATen; the input gradient also by the cpp kernel); *shared*: one "
           f"convolution over all T*N images with one set of weights (the compute floor's); "
           f"*GEMM*: torch.bmm on the per-task patch matrix built beforehand (the same FLOPs "
           f"at ATen's matrix-product rate for these shapes, im2col free; for the input "
           f"gradient without col2im); *unfold*: building that patch matrix with F.unfold.\n"]
    for b in blocks:
        out += [f"\n**{b['n_way']}-way, {b['threads']} thread(s)**: matrix-multiply rate "
                f"{b['matmul_gflops']:.0f} GFLOP/s (2048 x 2048)\n",
                "| layer | GFLOP | fwd grouped | fwd shared | fwd GEMM | wgrad grouped | "
                "wgrad shared | wgrad GEMM | igrad grouped | igrad kernel | igrad shared | "
                "igrad GEMM | unfold ms |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                "---: | ---: |"]
        for i, r in enumerate(b["layers"]):
            out.append(f"| {i + 1} ({r['c']}x{r['h']}x{r['h']}) | {r['gflop']:.3f} | "
                       + " | ".join(_cell(r, k) for k in (
                           "fwd", "fwd_shared", "fwd_gemm", "wgrad", "wgrad_shared",
                           "wgrad_gemm", "igrad", "igrad_kernel", "igrad_shared", "igrad_gemm"))
                       + f" | {r['ms']['unfold']:.2f} |")
        tot = b["per_pass_ms"]
        out.append(f"\nOne forward + backward pass, all layers: as the engine runs it "
                   f"{tot['engine']:.1f} ms, shared weights {tot['shared']:.1f} ms, at the "
                   f"GEMM bound {tot['gemm']:.1f} ms (input gradients without col2im), at "
                   f"the matrix-multiply rate {tot['flop_bound']:.1f} ms.")
    return "\n".join(out) + "\n"


def per_pass(layers, rate) -> dict:
    """ms of one forward + backward pass (forward, weight gradient, input gradient but for
    layer 1): the engine's choice, shared weights, the GEMM bound, the FLOP bound."""
    def igrad(r):  # the kernel where it applies, as the cpp backend runs it
        return r["ms"].get("igrad_kernel", r["ms"].get("igrad", 0.0))
    eng = sum(r["ms"]["fwd"] + r["ms"]["wgrad"] + igrad(r) for r in layers)
    sh = sum(r["ms"]["fwd_shared"] + r["ms"]["wgrad_shared"] + r["ms"].get("igrad_shared", 0)
             for r in layers)
    gm = sum(r["ms"]["fwd_gemm"] + r["ms"]["wgrad_gemm"] + r["ms"].get("igrad_gemm", 0)
             for r in layers)
    fl = sum(r["gflop"] * (3 if r["c"] > 1 else 2) for r in layers) / rate * 1e3
    return {"engine": eng, "shared": sh, "gemm": gm, "flop_bound": fl}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n-way", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.malloc == "keep":
        from imaml_fast.cpu_memory import keep_freed_cpu_memory

        keep_freed_cpu_memory()
    kernel = None
    try:
        from imaml_fast.backends import resolve_backend

        kernel = resolve_backend("cpp", torch.device("cpu"), torch.float32).ops().get(
            "conv_input_grad")
    except (ValueError, RuntimeError) as e:
        print(f"cpp backend not available ({e}): no kernel column")
    torch.manual_seed(0)
    blocks = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rate = matmul_gflops()
        for n in args.n_way:
            layers = [layer_rates(n, c, h, args.repeats, kernel) for c, h in LAYERS]
            blocks.append({"n_way": n, "threads": threads, "matmul_gflops": rate,
                           "layers": layers, "per_pass_ms": per_pass(layers, rate)})
            print(f"{n}-way, {threads} thread(s): {blocks[-1]['per_pass_ms']}", flush=True)
    meta = run_meta("benchmarks/conv_rates.py", {"tasks": T, "repeats": args.repeats,
                                                  "malloc": args.malloc})
    meta["threads"] = ", ".join(map(str, args.threads))  # one block per thread count
    md = markdown(meta, blocks)
    print(md)
    if args.json:
        write_results(args.json, {"meta": meta, "blocks": blocks}, md)


if __name__ == "__main__":
    main()
