"""``python -m tritonclip.bench`` / ``tritonclip-bench``: tritonclip against torch.nn.utils.

Runs every case on the available device, shows a progress bar, prints a table and writes
``results.json`` and PNG plots to ``--out``. On a machine without a GPU it benchmarks the CPU
path (tritonclip's torch backend) and says so: the Triton kernels need a GPU for speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os

import torch

from . import cases, report, timing

MB = 2**20
KB = 2**10
# --quick on a GPU: the two models of the README's quick table, three sizes per sweep.
_QUICK_GPU = {
    "models": ["gpt2-small", "lstm-2layer"],
    "one_tensor_bytes": [1 * MB, 16 * MB, 256 * MB],
    "many_small_counts": [100, 1000, 5000],
}
# --quick on the CPU: smaller sets, so that it takes well under a minute on a 2-core machine
# shared with other jobs (CI). Measured there at load 2-3, one thread: the GPU's sets take
# 62 s (GPT-2 alone 14 s, 5000 tensors 9 s), these 39 s. The models are the two smallest
# real ones (ResNet-18: 62 tensors of every size; the LSTM: 11 large ones); the sweeps still
# span the caches to memory, and ten to a thousand tensors.
_QUICK_CPU = {
    "models": ["resnet18", "lstm-2layer"],
    "one_tensor_bytes": [64 * KB, 4 * MB, 64 * MB],
    "many_small_counts": [10, 100, 1000],
}
_FULL = {
    "models": list(cases.shape_sets.MODELS),
    "one_tensor_bytes": [MB * 4**k for k in range(7)],  # 1 MB .. 4 GB
    "many_small_counts": [10, 100, 500, 1000, 2000, 5000],
}
SWEEPS = ("one-tensor", "many-small")
# Sets with more tensors than this skip the torch.compile baseline: compiling a graph over
# thousands of tensors takes minutes.
_COMPILE_MAX_TENSORS = 1000
# Free memory an op needs once the gradients and their saved copy exist, in gradient sizes:
# the step's weights and AdamW's two moments; AGC's weights, with headroom.
_EXTRA_MEMORY = {"step": 3, "agc": 3.5}
# Timed calls per measurement by default (at least; on the CPU, calls under 40 ms take more:
# timing.CPU_MIN_SAMPLED_MS). Five give a 20th and a 75th percentile; calls that long are
# long against the bursts of interference those would otherwise have to see past.
DEFAULT_REPS = 5
INSTALL_HINT = ('pip install "tritonclip[bench]"  (in a checkout of tritonclip: '
                'pip install -e ".[bench]")')


def parse_args(argv=None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonclip-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a run of under a minute: two models, three sizes per sweep, "
                             "the core ops (smaller sets on the CPU than on a GPU)")
    parser.add_argument("--cases", default="all", type=_names(case_names(), "case"),
                        help="comma-separated: %s, or 'all'" % ", ".join(case_names()))
    parser.add_argument("--ops", default=None, type=_names(cases.OPS, "op"),
                        help="comma-separated subset of %s, or 'all' (default: all; with "
                             "--quick: %s)" % (", ".join(cases.OPS), ", ".join(cases.QUICK_OPS)))
    parser.add_argument("--dtype", default=None, type=_names(cases.DTYPES, "dtype"),
                        help="comma-separated subset of %s, or 'all' (default: bf16 on a GPU, "
                             "fp32 on the CPU)" % ", ".join(cases.DTYPES))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch.compile'd clips, torch's and tritonclip's "
                             "(default: on unless --quick)")
    parser.add_argument("--reps", type=_positive_int, default=DEFAULT_REPS,
                        help="timed calls per measurement, at least (default %d; on the CPU "
                             "short calls repeat until %g ms are timed, at most %d calls; CUDA "
                             "uses triton.testing.do_bench's own count)"
                             % (DEFAULT_REPS, timing.CPU_MIN_SAMPLED_MS, timing.CPU_MAX_REPS))
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch's intra-op CPU threads during the run (default 1: a "
                             "thread pool on a shared machine stalls on descheduled workers)")
    parser.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    return parser


def case_names() -> list[str]:
    """What ``--cases`` accepts besides 'all': the model names and the two sweeps."""
    return list(cases.shape_sets.MODELS) + list(SWEEPS)


def _names(valid, what: str):
    """An argparse type: a comma-separated list of names from ``valid``, or ``['all']``."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",")]
        if names == ["all"]:
            return names
        unknown = [name for name in names if name not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {', '.join(map(repr, unknown))}; choose from "
                f"{', '.join(valid)} or 'all'")
        return names
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def require_bench_extra() -> None:
    """Exit with the install line, not a traceback, when the ``bench`` extra (tqdm for the
    progress bar, matplotlib for the plots) is missing."""
    missing = []
    for module in ("tqdm", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(f"tritonclip-bench needs {' and '.join(missing)}, from the 'bench' "
                         f"extra. Install it with:\n    {INSTALL_HINT}")


def _selection(args, device):
    """(models, one-tensor bytes, many-small counts, dtype names, ops) that ``args`` ask for."""
    if not args.quick:
        config = _FULL
    else:
        config = _QUICK_GPU if device.type == "cuda" else _QUICK_CPU
    wanted = None if args.cases == ["all"] else set(args.cases)
    if wanted is None:
        models = config["models"]
    else:  # a model named on the command line runs even when --quick would not pick it
        models = [m for m in cases.shape_sets.MODELS if m in wanted]
    one = config["one_tensor_bytes"] if wanted is None or "one-tensor" in wanted else []
    many = config["many_small_counts"] if wanted is None or "many-small" in wanted else []
    default_dtype = "bf16" if device.type == "cuda" else "fp32"
    names = args.dtype or [default_dtype]
    if names == ["all"]:
        names = list(cases.DTYPES)
    if args.ops is None:
        ops = list(cases.QUICK_OPS if args.quick else cases.OPS)
    else:
        ops = list(cases.OPS) if args.ops == ["all"] else args.ops
    return models, one, many, names, ops


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def busy_warning(load: dict) -> str | None:
    """The warning for a busy machine (:func:`timing.machine_load`), or None."""
    if not load["busy"]:
        return None
    return (f"this machine is busy: 1-minute load average {load['load_average_1min']:.2f} "
            f"above its {load['cpu_count']} cores. Other processes share the cores, so times "
            "are noisy and rows may be marked unstable; rerun on a quieter machine to trust "
            "small differences.")


def backend_label(device: torch.device, dtype_name: str) -> str:
    """Which tritonclip backend runs ``dtype_name`` gradients on ``device`` (the same choice
    as ``backend='auto'`` or $TRITONCLIP_BACKEND): 'Triton' or 'torch backend'."""
    from tritonclip import _core, _layout

    dtypes = cases.DTYPES[dtype_name]
    dtype = dtypes[0] if isinstance(dtypes, list) else dtypes
    backend, _ = _layout.choose_backend(_core.backend_name(None), device, dtype, torch.strided)
    return "Triton" if backend.name == "triton" else f"{backend.name} backend"


def run(args) -> dict:
    """Time every selected case with torch's intra-op threads pinned to ``args.threads``;
    return the result (machine, method, warnings, records with ratios)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    load = timing.machine_load()
    warnings = [w for w in (busy_warning(load),) if w]
    for warning in warnings:
        print(f"tritonclip-bench: WARNING: {warning}", flush=True)
    if device.type == "cpu":
        print("tritonclip-bench: no GPU here, so this measures the CPU path (tritonclip's torch "
              f"backend) with {args.threads} torch thread(s). The Triton kernels need a GPU "
              "for speed.", flush=True)
    with torch_threads(args.threads):
        stamp = dict(timing.machine_stamp(device), **load)
        copy_gbps = timing.copy_bandwidth_gbps(
            device, (1024 if device.type == "cuda" else 256) * MB, args.reps)
        records = _run_all(args, device, copy_gbps)
    dtype_names = _selection(args, device)[3]
    return {"machine": stamp, "copy_bandwidth_gbps": copy_gbps,
            "method": _method(device, args),
            "tritonclip_backend": {name: backend_label(device, name) for name in dtype_names},
            "warnings": warnings, "args": vars(args), "results": report.with_ratios(records)}


def _method(device: torch.device, args) -> dict:
    """How the times were taken, recorded with the results."""
    if device.type == "cuda":
        timer = ("triton.testing.do_bench (CUDA events, L2 flushed); active: CUDA events "
                 "around each call after an untimed restore and L2 flush")
        statistic = "median of the calls (CUDA events)"
        reps = f"do_bench default (active: max(reps, 25) = {max(args.reps, 25)})"
    else:
        timer = ("time.perf_counter around each call, after one untimed warm-up call; the "
                 "implementations of a case interleaved, one call of each per round")
        statistic = "20th percentile of the calls (interference only adds time)"
        reps = (f"at least {args.reps}; calls continue until {timing.CPU_MIN_SAMPLED_MS:g} ms "
                f"are timed, at most {timing.CPU_MAX_REPS}")
    return {
        "timer": timer, "statistic": statistic, "time_ms_field": timing.statistic_name(device),
        "reps": reps, "threads": args.threads,
        "unstable_rule": f"(p75_ms - min_ms) / min_ms > {report.UNSTABLE_SPREAD} for this time or "
                         "one it is compared with",
        "norm_type": 2.0, "max_norm": {"active": cases.MAX_NORM, "inactive": 1e9},
        "clip_value": 1e-3, "gradient_norm_before_each_active_call": cases.TOTAL_NORM,
    }


def _run_all(args, device, copy_gbps) -> list[dict]:
    from tqdm import tqdm

    models, one, many, dtype_names, ops = _selection(args, device)
    include_compile = (not args.quick) if args.compile is None else args.compile
    impls = cases.implementations(include_compile)
    step_impls = cases.step_implementations(include_compile)
    work = []
    for dtype_name in dtype_names:
        dtypes = cases.DTYPES[dtype_name]
        element_size = (dtypes[0] if isinstance(dtypes, list) else dtypes).itemsize
        for gset in cases.gradient_sets(models, one, many, element_size):
            work.append((gset, dtype_name))
    per_set = sum(len(step_impls) if op == "step" else len(impls) for op in ops)
    records = []
    with tqdm(total=per_set * len(work), unit="case", dynamic_ncols=True) as bar:
        for gset, dtype_name in work:
            records += _run_set(gset, dtype_name, ops, impls, step_impls, device, args.reps,
                                copy_gbps, bar)
    return records


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
        bar.set_description(f"{gset.name} {dtype_name} {op}")
        cases.normalize_(grads)
        setup = cases.restorer(op, grads)
        candidates = step_impls if op == "step" else impls
        fns, skipped = _callables(op, candidates, params, grads, device)
        stats = timing.time_each(fns, device, reps, setup)
        for impl in candidates:
            record = dict(base, op=op, impl=impl)
            if impl in skipped:
                records.append(dict(record, skipped=skipped[impl]))
                continue
            record = _with_times(record, stats[impl], grads, copy_gbps)
            if gset.family == "many-small" and device.type == "cuda":
                # Launch-bound sets: the host work too (on the CPU every time includes it).
                record["wall_ms_per_call"] = timing.wall_time_ms(fns[impl], device,
                                                                 max(reps, 10), setup)
            records.append(record)
        bar.update(len(candidates))
        del fns, stats
    del params, grads, setup
    gc.collect()
    return records


def _callables(op, impls, params, grads, device) -> tuple[dict, dict]:
    """({impl: zero-argument function performing ``op``}, {impl: why it is skipped})."""
    if _grad_bytes(grads) * _EXTRA_MEMORY.get(op, 0) > _free_bytes(device):
        return {}, {impl: "not enough memory" for impl in impls}
    too_many = len(grads) > _COMPILE_MAX_TENSORS
    skipped = {impl: "too many tensors to compile a graph over"
               for impl in impls if impl in cases.COMPILED and too_many}
    if op == "step":
        compiled = any(impl in cases.COMPILED for impl in impls) and not too_many
        return cases.step_callables(grads, compiled), skipped
    fns = {}
    for impl in impls:
        if impl in skipped:
            continue
        try:
            fns[impl] = cases.callable_for(impl, op, params, grads)
        except KeyError:
            skipped[impl] = "no recipe for this case"
    return fns, skipped


def _grad_bytes(grads) -> int:
    return sum(g.numel() * g.element_size() for g in grads)


def _with_times(record, stats, grads, copy_gbps) -> dict:
    """``record`` with its times, the bytes it must move and the GB/s they make."""
    moved = cases.moved_bytes(record["impl"], record["op"], grads)
    gbps = moved / (stats["time_ms"] * 1e-3) / 1e9
    return dict(record, **stats, bytes_moved=moved, gbps=gbps, copy_fraction=gbps / copy_gbps)


def main(argv=None) -> None:
    args = parse_args(argv)
    require_bench_extra()
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(report.format_table(result))
    from .plot import plot_results

    pngs = plot_results(result, args.out)
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
