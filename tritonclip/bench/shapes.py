"""Parameter-shape sets of real models and synthetic sweeps, generated (nothing downloaded)."""

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
    """One Llama-7B decoder layer: two RMSNorm weights, q, k, v, o, gate, up and down
    (9 tensors, 202.4M elements)."""
    return [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (hidden, d), (hidden, d), (d, hidden)]


def llama_7b(layers: int = 32, vocab: int = 32000, d: int = 4096) -> list[tuple[int, ...]]:
    """Llama-7B: embedding, 32 decoder layers, final norm, LM head (291 tensors, 6.74B)."""
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += llama_block(d)
    return shapes + [(d,), (vocab, d)]


def vit_b16(classes: int = 1000) -> list[tuple[int, ...]]:
    """ViT-B/16 at 224x224 (timm layout): 152 tensors, 86.6M elements."""
    d, mlp, tokens = 768, 3072, 197
    shapes: list[tuple[int, ...]] = [(1, 1, d), (1, tokens, d), (d, 3, 16, 16), (d,)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    return shapes + [(d,), (d,), (classes, d), (classes,)]


def lstm_2layer(inputs: int = 512, hidden: int = 1024, vocab: int = 10000) -> list[tuple[int, ...]]:
    """A 2-layer LSTM language model: embedding, two nn.LSTM layers, decoder (11 tensors, 30.1M elements)."""
    shapes: list[tuple[int, ...]] = [(vocab, inputs)]
    for layer in range(2):
        width = inputs if layer == 0 else hidden
        shapes += [(4 * hidden, width), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    return shapes + [(vocab, hidden), (vocab,)]


def resnet18(classes: int = 1000) -> list[tuple[int, ...]]:
    """ResNet-18 (torchvision layout: convolutions without bias, batch norms' weight and bias):
    62 tensors, 11.7M elements, from 64-element norms to 2.4M-element convolutions."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    width = 64
    for stage, out in enumerate((64, 128, 256, 512)):
        for block in range(2):
            downsample = block == 0 and stage > 0
            shapes += [(out, width, 3, 3), (out,), (out,), (out, out, 3, 3), (out,), (out,)]
            if downsample:
                shapes += [(out, width, 1, 1), (out,), (out,)]
            width = out
    return shapes + [(classes, 512), (classes,)]


MODELS = {
    "gpt2-small": gpt2_small,
    "llama-block": llama_block,
    "llama-7b": llama_7b,
    "vit-b16": vit_b16,
    "lstm-2layer": lstm_2layer,
    "resnet18": resnet18,
}


def one_tensor(nbytes: int, element_size: int) -> list[tuple[int, ...]]:
    """A single tensor of ``nbytes`` (the "one large tensor" sweep)."""
    return [(nbytes // element_size,)]


def many_small(count: int, numel: int = 4096) -> list[tuple[int, ...]]:
    """``count`` tensors of ``numel`` elements (the "many small tensors" sweep)."""
    return [(numel,)] * count


def make_grads(shapes, dtypes, device, seed: int = 0) -> list[torch.Tensor]:
    """One separately allocated gradient per shape, as nn.Module parameters have; ``dtypes``
    is a dtype or a list cycled over the shapes (a mixed-precision list)."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes]
    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(
            dtypes[i % len(dtypes)])
        for i, shape in enumerate(shapes)
    ]


def numel(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
