"""A whole training step (forward, backward, clip, fused AdamW step), with each way of
clipping side by side in one run: no clip, torch's clip, tritonclip's clip, tritonclip's clip
folded into the step, and the norm taken during backward (overlap) and folded.

    python -m tritonclip.bench.train_step --model gpt2,llama-1b --dtype bf16 --out bench-out

The issue's target for overlap: a step at most 1.02x the step without clipping (GPT-2 124M
and a Llama-style 1B decoder in bf16 on one GPU). Each implementation trains its own copy
of the model (the overlap's hooks stay on its copy), from the same weights and batch; the
run first takes one step of each and checks that their norms agree. On a CPU the models are
too slow to time at full size: ``--model tiny`` is there for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import tritonclip
import tritonclip.optim

from .timing import machine_load, machine_stamp, time_each

MAX_NORM = 1e-3  # below every norm seen: the clip is always active

# name: (vocab, d_model, layers, heads, d_ff, llama-style (RMSNorm, SwiGLU, untied head),
#        batch, sequence)
MODELS = {
    "gpt2": (50257, 768, 12, 12, 3072, False, 8, 512),       # GPT-2 small, 124M
    "llama-1b": (32000, 2048, 16, 32, 8192, True, 4, 512),   # Llama-3.2-1B-like, 1.2B
    "tiny": (256, 64, 2, 4, 256, True, 2, 32),                # a smoke run anywhere
}
IMPLEMENTATIONS = ("no-clip", "torch", "tritonclip", "tritonclip-folded", "tritonclip-overlap")


class _Block(torch.nn.Module):
    def __init__(self, d, heads, ff, llama):
        super().__init__()
        norm = torch.nn.RMSNorm if llama else torch.nn.LayerNorm
        self.heads, self.llama = heads, llama
        self.norm1, self.norm2 = norm(d), norm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=not llama)
        self.out = torch.nn.Linear(d, d, bias=not llama)
        self.up = torch.nn.Linear(d, 2 * ff if llama else ff, bias=not llama)
        self.down = torch.nn.Linear(ff, d, bias=not llama)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).transpose(1, 3).unbind(2)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attention.transpose(1, 2).reshape(b, t, d))
        h = self.up(self.norm2(x))
        if self.llama:
            gate, h = h.chunk(2, dim=-1)
            h = F.silu(gate) * h
        else:
            h = F.gelu(h, approximate="tanh")
        return x + self.down(h)


class Decoder(torch.nn.Module):
    """A decoder-only transformer: GPT-2 (LayerNorm, GELU, tied head) or Llama-style
    (RMSNorm, SwiGLU, untied head). Positions are learned (GPT-2) or left out."""

    def __init__(self, vocab, d, layers, heads, ff, llama, sequence):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.position = None if llama else torch.nn.Embedding(sequence, d)
        self.blocks = torch.nn.ModuleList(_Block(d, heads, ff, llama) for _ in range(layers))
        self.norm = (torch.nn.RMSNorm if llama else torch.nn.LayerNorm)(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        if not llama:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.position is not None:
            x = x + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _step_fn(name: str, model, optimizer, tokens, targets):
    """One training step with the clip ``name``; returns the norm (None for no-clip)."""
    handle = tritonclip.overlap_norm(model) if name == "tritonclip-overlap" else None
    params = [p for p in model.parameters()]

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        norm = None
        if name == "torch":
            norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        elif name == "tritonclip":
            norm = tritonclip.clip_grad_norm_(params, MAX_NORM)
        elif name == "tritonclip-folded":
            norm = tritonclip.optim.clip_into_(optimizer, MAX_NORM)
        elif name == "tritonclip-overlap":
            norm = handle.clip_(MAX_NORM, optimizer)
        optimizer.step()
        return norm

    return step


def run(model_name: str, dtype: torch.dtype, device: torch.device, reps: int,
        implementations=IMPLEMENTATIONS) -> dict:
    vocab, d, layers, heads, ff, llama, batch, sequence = MODELS[model_name]
    torch.manual_seed(0)
    base = Decoder(vocab, d, layers, heads, ff, llama, sequence).to(device=device, dtype=dtype)
    tokens = torch.randint(vocab, (batch, sequence), device=device)
    targets = torch.randint(vocab, (batch, sequence), device=device)
    steps = {}
    for name in implementations:
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=True)
        steps[name] = _step_fn(name, model, optimizer, tokens, targets)
    parameters = sum(p.numel() for p in base.parameters())  # (tied weights counted once)
    del base
    # One step of each from the same weights and batch: their norms must agree.
    norms = {name: step() for name, step in steps.items()}
    norms = {name: float(n) for name, n in norms.items() if n is not None}
    reference = norms.get("torch")
    agree = reference is None or all(math.isclose(n, reference, rel_tol=1e-3)
                                     for n in norms.values())
    times = time_each(steps, device, reps)
    no_clip = times.get("no-clip", {}).get("time_ms")
    records = []
    for name, stats in times.items():
        record = {"implementation": name, **stats}
        if no_clip:
            record["vs_no_clip"] = stats["time_ms"] / no_clip
        if "torch" in times:
            record["speedup_vs_torch"] = times["torch"]["time_ms"] / stats["time_ms"]
        records.append(record)
    return {"machine": machine_stamp(device), "load": machine_load(), "model": model_name,
            "parameters": parameters, "dtype": str(dtype).removeprefix("torch."),
            "batch": batch, "sequence": sequence, "max_norm": MAX_NORM, "norms": norms,
            "norms_agree": agree, "records": records}


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"# train step: {result['model']} ({result['parameters'] / 1e6:.0f}M parameters, "
             f"{result['dtype']}, batch {result['batch']} x {result['sequence']}), fused "
             f"AdamW; {m['device']}, torch {m['torch']}, triton {m['triton']}, commit "
             f"{m['commit']}",
             "| clip | step ms | vs no clip | speedup vs torch's clip |", "|---|---:|---:|---:|"]
    for r in result["records"]:
        lines.append(f"| {r['implementation']} | {r['time_ms']:.3f} | "
                     f"{r.get('vs_no_clip', math.nan):.3f}x | "
                     f"{r.get('speedup_vs_torch', math.nan):.2f}x |")
    lines.append(f"norms of one step from the same weights: {result['norms']} "
                 f"({'agree' if result['norms_agree'] else 'DISAGREE'} to 1e-3)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonclip.bench.train_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2",
                        help=f"comma-separated, of {', '.join(MODELS)} (default gpt2)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--reps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="folder for train-step.json (every model's results)")
    args = parser.parse_args(argv)
    models = args.model.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--model: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    for model in models:
        results.append(run(model, dtype, torch.device(args.device), args.reps))
        print(format_table(results[-1]), flush=True)
        if args.out:  # (rewritten after each model: a timeout keeps what was measured)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "train-step.json"), "w") as f:
                json.dump(results, f, indent=1)
    return 0 if all(r["norms_agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
