"""Error clipping in an LSTM unrolled over 250 steps: with per-step error clipping, the
gradient that reaches the first step stays bounded; without it, it explodes.

An ``nn.LSTMCell`` whose recurrent weights are initialised large (std ``gain / sqrt(hidden)``,
gain 6, forget-gate bias 1) is trained with Adam on generated data (predict a running sum
of recent inputs at every step), twice from the same initialisation and batches: once plain,
once with ``tritonclip.register_error_clip(model, max_norm=..., dim=-1, filter=nn.LSTMCell)``,
which clips each sample's gradient of (h, c) at every step of backpropagation through time.
It prints, per training iteration, the loss and the norm of the gradient that arrives at the
first step's hidden state h_1, the per-step norms of one backward pass, and writes a PNG.

Run (about 17 s on the 2-core CI machine)::

    python examples/rnn_error_clip.py          # writes examples-out/rnn_error_clip.png
    python examples/rnn_error_clip.py --steps 400 --iters 40 --out /tmp/plot.png

Without ``TRITON_INTERPRET=1``, error clipping on CPU tensors runs its torch implementation
(the same arithmetic as the kernels; the Triton kernels run on CUDA, or on CPU under the
interpreter, which is far too slow for this). On a GPU, pass ``--device cuda``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

import tritonclip


class Model(nn.Module):
    """An LSTM written with LSTMCell (one call per step, so hooks see every step)."""

    def __init__(self, inputs: int, hidden: int, gain: float, forget_bias: float):
        super().__init__()
        self.cell = nn.LSTMCell(inputs, hidden)
        self.readout = nn.Linear(hidden, 1)
        with torch.no_grad():
            # Large recurrent weights: the Jacobian of one step has norm > 1, so the gradient
            # through T steps grows like its product.
            self.cell.weight_hh.normal_(0.0, gain / math.sqrt(hidden))
            self.cell.bias_ih.zero_()
            self.cell.bias_hh.zero_()
            self.cell.bias_ih[hidden:2 * hidden] = forget_bias  # gate order: i, f, g, o

    def forward(self, x: torch.Tensor):
        """x: [T, B, inputs] -> (predictions [T, B], hidden states h_1..h_T)."""
        batch = x.shape[1]
        hidden = self.cell.hidden_size
        h = x.new_zeros(batch, hidden)
        c = x.new_zeros(batch, hidden)
        states, predictions = [], []
        for x_t in x:
            h, c = self.cell(x_t, (h, c))
            if h.requires_grad:
                h.retain_grad()  # the gradient arriving at h_t (before its own clip)
            states.append(h)
            predictions.append(self.readout(h).squeeze(-1))
        return torch.stack(predictions), states


def batch(steps: int, size: int, inputs: int, window: int, generator: torch.Generator):
    """Inputs and targets: the target at step t is the mean of the first input feature over
    the last ``window`` steps (a short-memory task)."""
    x = torch.randn(steps, size, inputs, generator=generator)
    kernel = torch.ones(1, 1, window) / window
    padded = torch.nn.functional.pad(x[:, :, 0].T.unsqueeze(1), (window - 1, 0))
    target = torch.nn.functional.conv1d(padded, kernel).squeeze(1).T
    return x, target


def train(args, clip: bool) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = Model(args.inputs, args.hidden, args.gain, args.forget_bias).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    counter = tritonclip.ClipCounter(device)
    handle = None
    if clip:
        handle = tritonclip.register_error_clip(model, max_norm=args.max_norm, dim=-1,
                                                filter=nn.LSTMCell, counter=counter,
                                                backend=args.backend)
    generator = torch.Generator().manual_seed(args.seed + 1)
    history = {"loss": [], "first_grad": [], "per_step": None}
    for iteration in range(args.iters):
        x, target = batch(args.steps, args.batch, args.inputs, args.window, generator)
        x, target = x.to(device), target.to(device)
        predictions, states = model(x)
        loss = torch.nn.functional.mse_loss(predictions, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        history["first_grad"].append(states[0].grad.norm().item())
        if iteration == 0:
            history["per_step"] = [s.grad.norm().item() for s in states]
    if handle is not None:
        handle.remove()
    history["clipped"] = int(counter.clipped)
    history["seen"] = int(counter.seen)
    return history


def plot(plain: dict, clipped: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, args.steps + 1)
    left.semilogy(steps, plain["per_step"], label="no error clipping")
    left.semilogy(steps, clipped["per_step"], label=f"error clip, max_norm={args.max_norm}")
    left.set_xlabel("time step t")
    left.set_ylabel("||dL/dh_t|| (first iteration)")
    left.set_title("gradient through time")
    left.legend()
    iterations = range(1, args.iters + 1)
    right.semilogy(iterations, plain["first_grad"], label="no error clipping")
    right.semilogy(iterations, clipped["first_grad"], label="error clip")
    right.set_xlabel("training iteration")
    right.set_ylabel("||dL/dh_1||")
    right.set_title(f"first step's hidden state ({args.steps} steps)")
    right.legend()
    fig.suptitle(f"LSTMCell, hidden {args.hidden}, recurrent gain {args.gain}")
    fig.tight_layout()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--gain", type=float, default=6.0)
    parser.add_argument("--forget-bias", type=float, default=1.0)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, choices=[None, "auto", "triton", "torch"])
    parser.add_argument("--out", default="examples-out/rnn_error_clip.png",
                        help="PNG path ('' for none)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    # Small matrices: one thread is fastest, and steady on a loaded machine (with the
    # default thread count a busy 2-core box ran this ~20x slower).
    torch.set_num_threads(1)
    start = time.perf_counter()
    plain = train(args, clip=False)
    clipped = train(args, clip=True)
    print(f"LSTMCell hidden {args.hidden}, {args.steps} steps, recurrent gain {args.gain}, "
          f"error clip max_norm={args.max_norm} per sample (dim=-1) on (h, c)")
    print(f"{'iter':>4}  {'loss plain':>11}  {'loss clip':>11}  {'|dL/dh_1| plain':>16}  "
          f"{'|dL/dh_1| clip':>15}")
    for i in range(args.iters):
        print(f"{i + 1:>4}  {plain['loss'][i]:>11.4g}  {clipped['loss'][i]:>11.4g}  "
              f"{plain['first_grad'][i]:>16.4g}  {clipped['first_grad'][i]:>15.4g}")
    marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    print("per-step |dL/dh_t|, first iteration:")
    for name, run in (("plain", plain), ("clip", clipped)):
        print(f"  {name:>5}: " + "  ".join(f"t={t + 1}: {run['per_step'][t]:.3g}"
                                           for t in marks))
    print(f"slices clipped: {clipped['clipped']} of {clipped['seen']}")
    if args.out:
        plot(plain, clipped, args, args.out)
        print(f"wrote {args.out}")
    print(f"{time.perf_counter() - start:.1f} s")
    return {"plain": plain, "clipped": clipped}


if __name__ == "__main__":
    main()
