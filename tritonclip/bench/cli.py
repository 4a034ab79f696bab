"""``python -m tritonclip.bench`` / ``tritonclip-bench``: tritonclip against torch.nn.utils.

Runs every case on the available device, shows a progress bar, prints a table and writes
``results.json`` and PNG plots to ``--out``. On a machine without a GPU it benchmarks the CPU
path (tritonclip's torch backend) and says so: the Triton kernels need a GPU for speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

from . import cases, timing
from .report import format_table, with_ratios

MB = 2**20
_QUICK = {
    "models": ["gpt2-small", "lstm-2layer"],
    "one_tensor_bytes": [1 * MB, 16 * MB, 256 * MB],
    "many_small_counts": [100, 1000, 5000],
}
_FULL = {
    "models": list(cases.shape_sets.MODELS),
    "one_tensor_bytes": [MB * 4**k for k in range(7)],  # 1 MB .. 4 GB
    "many_small_counts": [10, 100, 500, 1000, 2000, 5000],
}
# Sets with more tensors than this skip the torch.compile baseline: compiling a graph over
# thousands of tensors takes minutes.
_COMPILE_MAX_TENSORS = 1000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tritonclip-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a run of under a minute: two models, three sizes per sweep")
    parser.add_argument("--cases", default="all",
                        help="comma-separated: model names (%s), 'one-tensor', 'many-small', "
                             "or 'all'" % ", ".join(cases.shape_sets.MODELS))
    parser.add_argument("--ops", default=None,
                        help="comma-separated subset of %s (default: all; with --quick: %s)"
                             % (", ".join(cases.OPS), ", ".join(cases.QUICK_OPS)))
    parser.add_argument("--dtype", default=None,
                        help="comma-separated subset of %s (default: bf16 on a GPU, fp32 on "
                             "the CPU; 'all' for every one)" % ", ".join(cases.DTYPES))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch.compile'd clips, torch's and tritonclip's "
                             "(default: on unless --quick)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per measurement on the CPU (default 5; CUDA uses "
                             "triton.testing.do_bench's own count)")
    parser.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    return parser.parse_args(argv)


def _selection(args, device):
    config = _QUICK if args.quick else _FULL
    wanted = set(args.cases.split(",")) if args.cases != "all" else None
    models = [m for m in config["models"] if wanted is None or m in wanted]
    if wanted is not None:
        unknown = wanted - set(cases.shape_sets.MODELS) - {"one-tensor", "many-small"}
        if unknown:
            sys.exit(f"tritonclip-bench: unknown case(s) {sorted(unknown)}")
        models = [m for m in cases.shape_sets.MODELS if m in wanted]
    one = config["one_tensor_bytes"] if wanted is None or "one-tensor" in wanted else []
    many = config["many_small_counts"] if wanted is None or "many-small" in wanted else []
    default_dtype = "bf16" if device.type == "cuda" else "fp32"
    names = (args.dtype or default_dtype).split(",")
    if names == ["all"]:
        names = list(cases.DTYPES)
    for name in names:
        if name not in cases.DTYPES:
            sys.exit(f"tritonclip-bench: unknown dtype {name!r}; choose from {list(cases.DTYPES)}")
    ops = args.ops.split(",") if args.ops else list(cases.QUICK_OPS if args.quick else cases.OPS)
    for op in ops:
        if op not in cases.OPS:
            sys.exit(f"tritonclip-bench: unknown op {op!r}; choose from {list(cases.OPS)}")
    return models, one, many, names, ops


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run(args) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cpu":
        print("tritonclip-bench: no GPU here, so this measures the CPU path (tritonclip's torch "
              "backend). The Triton kernels need a GPU for speed.", flush=True)
    models, one, many, dtype_names, ops = _selection(args, device)
    include_compile = (not args.quick) if args.compile is None else args.compile
    reps = args.reps or 5
    impls = cases.implementations(include_compile)
    step_impls = cases.step_implementations(include_compile)

    stamp = timing.machine_stamp(device)
    copy_gbps = timing.copy_bandwidth_gbps(device, (1024 if device.type == "cuda" else 256) * MB,
                                           reps)
    work = []
    for dtype_name in dtype_names:
        dtypes = cases.DTYPES[dtype_name]
        element_size = (dtypes[0] if isinstance(dtypes, list) else dtypes).itemsize
        for gset in cases.gradient_sets(models, one, many, element_size):
            work.append((gset, dtype_name))
    per_set = sum(len(step_impls) if op == "step" else len(impls) for op in ops)
    total = per_set * len(work)

    from tqdm import tqdm

    records = []
    with tqdm(total=total, unit="case", dynamic_ncols=True) as bar:
        for gset, dtype_name in work:
            records += _run_set(gset, dtype_name, ops, impls, step_impls, device, reps,
                                copy_gbps, bar)
    method = {
        "timer": ("triton.testing.do_bench (CUDA events, L2 flushed); active: CUDA events "
                  "around each call after an untimed restore and L2 flush")
        if device.type == "cuda" else "time.perf_counter per call, median of reps",
        "reps": reps if device.type != "cuda" else "do_bench default (active: max(reps, 25))",
        "norm_type": 2.0, "max_norm": {"active": cases.MAX_NORM, "inactive": 1e9},
        "clip_value": 1e-3, "gradient_norm_before_each_active_call": cases.TOTAL_NORM,
    }
    return {"machine": stamp, "copy_bandwidth_gbps": copy_gbps, "method": method,
            "args": vars(args), "results": with_ratios(records)}


def _run_set(gset, dtype_name, ops, impls, step_impls, device, reps, copy_gbps, bar
             ) -> list[dict]:
    dtypes = cases.DTYPES[dtype_name]
    sizes = [d.itemsize for d in (dtypes if isinstance(dtypes, list) else [dtypes])]
    nbytes = sum(cases.shape_sets.numel([shape]) * sizes[i % len(sizes)]  # as make_grads
                 for i, shape in enumerate(gset.shapes))
    base = {"set": gset.name, "family": gset.family, "tensors": len(gset.shapes),
            "dtype": dtype_name, "grad_bytes": nbytes}
    records = []
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the previous set cached counts as free
    # The gradients, plus a saved copy for the active case, plus headroom for baselines.
    if nbytes * 2.5 > _free_bytes(device):
        for op in ops:
            for impl in step_impls if op == "step" else impls:
                records.append(dict(base, op=op, impl=impl, skipped="not enough memory"))
                bar.update()
        return records
    grads = cases.shape_sets.make_grads(gset.shapes, dtypes, device)
    params = cases.make_params(grads)
    for op in ops:
        cases.normalize_(grads)
        setup = cases.restorer(op, grads)
        if op == "step":
            records += _step_records(base, grads, step_impls, device, reps, copy_gbps, setup,
                                     bar)
            continue
        for impl in impls:
            bar.set_description(f"{gset.name} {dtype_name} {op} {impl}")
            record = dict(base, op=op, impl=impl)
            if impl in cases.COMPILED and len(grads) > _COMPILE_MAX_TENSORS:
                record["skipped"] = "too many tensors to compile a graph over"
                records.append(record)
                bar.update()
                continue
            if op == "agc" and nbytes * 3.5 > _free_bytes(device):  # + weights to read
                record["skipped"] = "not enough memory"
                records.append(record)
                bar.update()
                continue
            try:
                fn = cases.callable_for(impl, op, params, grads)
            except KeyError:
                record["skipped"] = "no recipe for this case"
                records.append(record)
                bar.update()
                continue
            stats = timing.device_time_ms(fn, device, reps, setup)
            moved = cases.moved_bytes(impl, op, grads)
            gbps = moved / (stats["median_ms"] * 1e-3) / 1e9
            record.update(stats, bytes_moved=moved, gbps=gbps, copy_fraction=gbps / copy_gbps)
            if gset.family == "many-small":
                record["wall_ms_per_call"] = timing.wall_time_ms(fn, device, max(reps, 10),
                                                                 setup)
            records.append(record)
            bar.update()
    del params, grads, setup
    gc.collect()
    return records


def _step_records(base, grads, step_impls, device, reps, copy_gbps, setup, bar
                  ) -> list[dict]:
    """The step case: clip + fused AdamW step, with each clip's overhead over the step alone
    (``step_impls`` ends with the step alone)."""
    records = []
    compiled_too = any(impl in cases.COMPILED for impl in step_impls)
    # Weights and AdamW's two moments on top of the gradients and their saved copy.
    too_many = compiled_too and len(grads) > _COMPILE_MAX_TENSORS
    if base["grad_bytes"] * 3 > _free_bytes(device):
        for impl in step_impls:
            records.append(dict(base, op="step", impl=impl, skipped="not enough memory"))
            bar.update()
        return records
    fns = cases.step_callables(grads, compiled_too and not too_many)
    for impl in step_impls:
        bar.set_description(f"{base['set']} {base['dtype']} step {impl}")
        if impl not in fns:
            records.append(dict(base, op="step", impl=impl,
                                skipped="too many tensors to compile a graph over"))
            bar.update()
            continue
        stats = timing.device_time_ms(fns[impl], device, reps, setup)
        moved = cases.moved_bytes(impl, "step", grads)
        gbps = moved / (stats["median_ms"] * 1e-3) / 1e9
        records.append(dict(base, op="step", impl=impl, **stats, bytes_moved=moved, gbps=gbps,
                            copy_fraction=gbps / copy_gbps))
        bar.update()
    by_impl = {r["impl"]: r for r in records if "median_ms" in r}
    alone = by_impl["optimizer-only"]["median_ms"]
    for r in by_impl.values():
        if r["impl"] != "optimizer-only":
            r["clip_overhead_ms"] = r["median_ms"] - alone
    for ours, theirs in (("tritonclip", "torch-foreach"),
                         ("tritonclip-compile", "torch-compile")):
        if ours in by_impl and theirs in by_impl:
            theirs_ms = by_impl[theirs]["clip_overhead_ms"]
            by_impl[ours]["overhead_vs_torch"] = (by_impl[ours]["clip_overhead_ms"] / theirs_ms
                                                  if theirs_ms > 0 else float("nan"))
    del fns
    return records


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(format_table(result))
    try:
        from .plot import plot_results
    except ImportError:  # matplotlib is in the bench extra
        print("tritonclip-bench: matplotlib is not installed, no plots "
              "(pip install 'tritonclip[bench]')")
        pngs = []
    else:
        pngs = plot_results(result, args.out)
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
