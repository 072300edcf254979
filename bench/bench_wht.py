"""Benchmark: wht (blocked butterfly) against a dense x @ T.T, and the textbook radix-2 butterfly, same data.

    python bench/bench_wht.py                      # CPU, fp32, 2048 rows, n in {576, 1536, 4096, 14336}
    python bench/bench_wht.py --device cuda        # the same on a GPU (uses the CUDA kernel if available), then
                                                   # the kernel against the pure-torch path
    python bench/bench_wht.py --device cuda --kernel-only   # only that: bf16/fp16/fp32, 5 widths, forward + inverse

All three sides run in one process, alternating, after a warm-up; the table shows medians and the JSON line
(last line of stdout) carries the configuration, each side, the ratio and the max relative error vs dense.

On CUDA (or anywhere with --kernel-table) a second table times wht.wht as it dispatches (the fused kernel of
kernels/wht_cuda.cu where it is built, else the torch path) against the pure-torch path (QWHA_DISABLE_CUDA_WHT=1)
on --kernel-rows rows, for each of --kernel-dtypes, n in --kernel-widths and --directions (forward x Tᵀ, inverse
x T), and reports its effective bandwidth (bytes read + written / time) as a share of the device's peak (memory
clock · bus width · 2) and of a plain device copy of the same tensor (x.clone(), the same bytes: what the memory
system delivers in practice), and its largest difference from the torch path relative to the torch path's largest
entry. On CUDA each sample is timed with CUDA events around --burst calls queued back to back (the steady state of
a training step); elsewhere with the wall clock around the same burst (a smoke run: the two sides are one path).
--kernel-only skips the first table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import wht  # noqa: E402


def radix2_path(x: torch.Tensor) -> torch.Tensor:
    """x Tᵀ the textbook way: log2 P in-place radix-2 passes over the 2^p factor, then the K×K product."""
    m, n = x.shape
    K, P = wht.factorize(n)
    y = x.clone()
    wht.fwht_butterfly_(y.view(m * K, P))
    HK = wht.hadamard_core(K).to(device=x.device, dtype=x.dtype) / math.sqrt(n)
    return torch.matmul(HK, y.view(m, K, P)).view(m, n)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--widths", type=int, nargs="+", default=[576, 1536, 4096, 14336])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--no-radix2", action="store_true", help="skip the radix-2 butterfly column")
    ap.add_argument("--kernel-rows", type=int, default=16384, help="rows for the CUDA kernel table")
    ap.add_argument("--kernel-widths", type=int, nargs="+", default=[4096, 14336, 3072, 11008, 13824])
    ap.add_argument("--kernel-dtypes", default="bfloat16,float16,float32", help="comma list (kernel table)")
    ap.add_argument("--directions", default="forward,inverse", help="kernel table: forward, inverse or both")
    ap.add_argument("--kernel-table", action="store_true", help="the kernel table on a CPU too (a smoke run)")
    ap.add_argument("--kernel-only", action="store_true", help="only the kernel table")
    ap.add_argument("--no-torch", action="store_true", help="kernel table: skip the torch-path side (its time)")
    ap.add_argument("--burst", type=int, default=20,
                    help="CUDA kernel table: calls queued back to back per timed sample (CUDA events)")
    args = ap.parse_args(argv)
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    args.kernel_dtypes = [d for d in args.kernel_dtypes.split(",") if d]
    args.directions = [d for d in args.directions.split(",") if d]
    if not args.kernel_dtypes or any(d not in dtypes for d in args.kernel_dtypes):
        ap.error(f"--kernel-dtypes {','.join(args.kernel_dtypes)}: expected a comma list of {', '.join(dtypes)}")
    if not args.directions or any(d not in ("forward", "inverse") for d in args.directions):
        ap.error(f"--directions {','.join(args.directions)}: expected forward, inverse or forward,inverse")
    args.kernel_dtypes = [dtypes[d] for d in args.kernel_dtypes]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    rows = []
    for n in [] if args.kernel_only else args.widths:
        K, P = wht.factorize(n)
        x = torch.randn(args.rows, n, generator=gen).to(dev)
        T = wht.hadamard_matrix(n, device=dev)
        sides = {"dense": lambda: x @ T.T, "wht": lambda: wht.wht(x)}
        if not args.no_radix2:
            sides["radix2"] = lambda: radix2_path(x)
        times = {k: [] for k in sides}
        for k, fn in sides.items():  # warm-up
            fn()
        ref = x.double() @ T.double().T
        errs = {}
        for _ in range(args.repeats):
            for k, fn in sides.items():
                dt, out = timed(fn)
                times[k].append(dt)
                errs[k] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append({"n": n, "K": K, "P": P, **{f"{k}_ms": round(v, 3) for k, v in med.items()},
                     "speedup_vs_dense": round(med["dense"] / med["wht"], 2),
                     **({"speedup_vs_radix2": round(med["radix2"] / med["wht"], 2)} if "radix2" in med else {}),
                     **{f"max_rel_err_{k}": float(f"{v:.3g}") for k, v in errs.items()}})
        T = x = ref = None                # free the device memory (the closures above hold x and T)

    cuda_kernel = dev.type == "cuda" and wht._cuda_wht() is not None
    hdr = (f"{'n':>6} {'K*P':>9} {'dense ms':>10} {'wht ms':>9} {'radix2 ms':>10} {'x dense':>8} {'x radix2':>9} "
           f"{'rel err':>9}")
    if rows:
        print(f"wht benchmark: device={dev} dtype=float32 rows={args.rows} threads={torch.get_num_threads()} "
              f"repeats={args.repeats} cuda_kernel={cuda_kernel}")
        print(hdr)
    for r in rows:
        print(f"{r['n']:>6} {str(r['K']) + '*' + str(r['P']):>9} {r['dense_ms']:>10.1f} {r['wht_ms']:>9.1f} "
              f"{r.get('radix2_ms', float('nan')):>10.1f} {r['speedup_vs_dense']:>7.1f}x "
              f"{r.get('speedup_vs_radix2', float('nan')):>8.1f}x {r['max_rel_err_wht']:>9.1e}")
    result = {"bench": "wht", "device": str(dev), "dtype": "float32", "rows": args.rows,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "cuda_kernel": cuda_kernel,
              "torch": torch.__version__, "results": rows}
    if dev.type == "cuda" or args.kernel_table:
        result["kernel_rows"] = args.kernel_rows
        result["kernel"] = kernel_table(args, dev)
    print(json.dumps(result))
    return result


def peak_bandwidth(dev) -> float | None:
    """Theoretical DRAM bandwidth in bytes/s (2 transfers per memory clock), or None if torch does not say."""
    p = torch.cuda.get_device_properties(dev)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def gpu_seconds(fn, burst: int, dev=None) -> float:
    """Seconds per call of fn, from CUDA events around `burst` calls queued back to back: the steady state of a
    training step, where the host's per-call overhead (Python, dispatch, launch) overlaps the GPU's work instead
    of adding a launch and a synchronization to every sample. Off CUDA (dev not a CUDA device), the wall clock
    around the burst."""
    if dev is not None and torch.device(dev).type != "cuda":
        t = time.perf_counter()
        for _ in range(burst):
            fn()
        return (time.perf_counter() - t) / burst
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(burst):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / burst


def kernel_table(args, dev) -> list[dict]:
    """wht.wht as dispatched (the fused kernel where built) against the pure-torch path and a plain device copy
    (x.clone(), the same bytes read and written), per dtype, width and direction; same inputs, alternating,
    medians of `repeats` bursts."""
    cuda = dev.type == "cuda"
    kernel = cuda and wht._cuda_wht() is not None
    if cuda and not kernel:
        print("CUDA kernel unavailable (see the warning above): the dispatched side is the torch path")
    peak = peak_bandwidth(dev) if cuda else None
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(1)                  # inputs made on the device: no host copy
    out = []
    print(f"\n{'CUDA kernel' if kernel else 'wht (torch path)'} vs torch path and a device copy: {dev} "
          f"rows={args.kernel_rows} peak={f'{peak / 1e9:.0f} GB/s' if peak else '?'} burst={args.burst} "
          f"repeats={args.repeats}")
    print(f"{'n':>6} {'dtype':>9} {'dir':>4} {'wht ms':>9} {'torch ms':>9} {'speedup':>8} {'GB/s':>7} {'% peak':>7} "
          f"{'copy GB/s':>10} {'% copy':>7} {'rel err':>9}")
    for dtype in args.kernel_dtypes:
        for n in args.kernel_widths:
            x = torch.randn(args.kernel_rows, n, generator=gen, device=dev).to(dtype)
            for direction in args.directions:
                inv = direction == "inverse"

                def torch_path():
                    os.environ["QWHA_DISABLE_CUDA_WHT"] = "1"
                    try:
                        return wht.wht(x, inverse=inv)
                    finally:
                        del os.environ["QWHA_DISABLE_CUDA_WHT"]

                sides = {"kernel": lambda: wht.wht(x, inverse=inv), "copy": lambda: x.clone()}
                if not args.no_torch:
                    sides["torch"] = torch_path
                for fn in sides.values():
                    fn()
                sync()
                times = {k: [] for k in sides}
                for _ in range(args.repeats):
                    for k, fn in sides.items():
                        times[k].append(gpu_seconds(fn, args.burst, dev))
                yk, yt = sides["kernel"]().float(), torch_path().float()
                err = ((yk - yt).abs().max() / yt.abs().max()).item()
                del yk, yt
                med = {k: statistics.median(v) for k, v in times.items()}
                nbytes = 2 * x.numel() * x.element_size()
                gbs, copy_gbs = nbytes / med["kernel"] / 1e9, nbytes / med["copy"] / 1e9
                row = {"n": n, "dtype": str(dtype).split(".")[-1], "direction": direction,
                       "kernel_ms": med["kernel"] * 1e3, "torch_ms": med["torch"] * 1e3 if "torch" in med else None,
                       "speedup": med["torch"] / med["kernel"] if "torch" in med else None, "GBps": gbs,
                       "pct_peak": 100 * gbs * 1e9 / peak if peak else None, "copy_GBps": copy_gbs,
                       "pct_copy": 100 * gbs / copy_gbs, "max_rel_err_vs_torch": err, "burst": args.burst,
                       "cuda_kernel": kernel}
                out.append(row)
                tm = f"{row['torch_ms']:>9.3f} {row['speedup']:>7.1f}x" if "torch" in med else f"{'-':>9} {'-':>8}"
                pct = f"{row['pct_peak']:.0f}" if peak else "?"
                print(f"{n:>6} {row['dtype']:>9} {direction[:3]:>4} {row['kernel_ms']:>9.3f} {tm} {gbs:>7.4g} "
                      f"{pct:>7} {copy_gbs:>10.4g} {row['pct_copy']:>7.1f} {err:>9.1e}")
            x = None                      # free the device memory (the closures above hold x)
    return out


if __name__ == "__main__":
    main()
