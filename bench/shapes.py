"""Parameter-shape sets of real models, generated (nothing is downloaded)."""

from __future__ import annotations

import torch


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 124M (HF layout: Conv1D weights are [in, out]), 148 tensors, 124.4M elements."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_block(d: int = 4096, hidden: int = 11008) -> list[tuple[int, ...]]:
    """One Llama-7B decoder layer: q, k, v, o, gate, up, down and two RMSNorm weights
    (9 tensors, 202.4M elements)."""
    return [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (hidden, d), (hidden, d), (d, hidden)]


SHAPE_SETS = {"gpt2-small": gpt2_small, "llama-block": llama_block}


def make_grads(shapes, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
    """One separately allocated gradient per shape (as nn.Module parameters have)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
            for shape in shapes]


def grad_bytes(grads) -> int:
    return sum(g.numel() * g.element_size() for g in grads)
