"""A small LSTM on generated sine waves, trained with a deliberately high learning rate, with
five clipping recipes side by side: none, global norm, value, AGC and ZClip.

    python examples/lstm_clipping.py                 # ~25 s on the 2-core CI machine
    python examples/lstm_clipping.py --steps 50 --out /tmp/lstm   # quicker

Prints a table (final loss, steps with loss spikes, wall time) and writes
``<out>/lstm_clipping.png`` (loss and pre-clip gradient norm per step, one curve per recipe).

On a CPU, tritonclip's ``backend="auto"`` runs torch ops (the Triton kernels need a GPU, or
TRITON_INTERPRET=1, which is far too slow for training); on CUDA the same script runs the
kernels. Every recipe is attached to the optimizer with :func:`tritonclip.attach`; the
gradient norms come from :class:`tritonclip.GradNormMonitor`, read once at the end.

At this learning rate training is chaotic: the figures move from run to run (a norm's last
bit depends on the order its parts are summed in, which follows memory addresses), but the
picture does not: no clipping diverges, the recipes that bound each update survive.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import tritonclip

RECIPES = {
    "none": lambda: {},
    "global norm 1.0": lambda: {"max_norm": 1.0},
    "value 0.05": lambda: {"clip_value": 0.05},
    "AGC 0.05": lambda: {"agc": {"clip_factor": 0.05, "eps": 1e-3}},
    "ZClip": lambda: {"adaptive": tritonclip.ZClip()},  # the paper's defaults
}


class SineLSTM(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lstm = torch.nn.LSTM(1, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out)


def sine_batch(batch: int, length: int, generator: torch.Generator):
    """Sine waves of random frequency, phase and amplitude; target: the next value."""
    t = torch.arange(length + 1, dtype=torch.float32)
    freq = torch.rand(batch, 1, generator=generator) * 0.3 + 0.05
    phase = torch.rand(batch, 1, generator=generator) * 2 * math.pi
    amp = torch.rand(batch, 1, generator=generator) * 1.5 + 0.5
    wave = amp * torch.sin(freq * t + phase)
    return wave[:, :-1, None], wave[:, 1:, None]


def count_spikes(losses: list[float], factor: float = 2.0, window: int = 10) -> int:
    """Steps whose loss is non-finite or above ``factor`` x the median of the previous
    ``window`` losses."""
    spikes = 0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            spikes += 1
            continue
        previous = [x for x in losses[max(0, i - window):i] if math.isfinite(x)]
        if len(previous) >= 3 and loss > factor * sorted(previous)[len(previous) // 2]:
            spikes += 1
    return spikes


def train(recipe: str, args) -> dict:
    torch.manual_seed(0)
    model = SineLSTM(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    monitor = tritonclip.GradNormMonitor(model, top_k=1)
    config = RECIPES[recipe]()
    handle = tritonclip.attach(optimizer, monitor=monitor, **config) if config else None
    generator = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = sine_batch(args.batch, args.length, generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if handle is None:
            monitor.record()
        optimizer.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).tolist()  # one read at the end
    elapsed = time.perf_counter() - start
    if handle is not None:
        handle.remove()
    return {"losses": losses, "norms": monitor.to_dict()["total_norm"], "time": elapsed}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1.5, help="SGD lr (deliberately high)")
    parser.add_argument("--out", default="examples-out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is fastest and steadiest

    results = {name: train(name, args) for name in RECIPES}
    tail = max(1, args.steps // 10)
    print(f"LSTM({args.hidden}) on sine waves, SGD lr={args.lr} momentum=0.9, "
          f"{args.steps} steps, torch {torch.__version__}")
    print(f"{'recipe':<16} {'final loss':>12} {'spike steps':>12} {'wall time':>10}")
    for name, r in results.items():
        final = [x for x in r["losses"][-tail:]]
        final_loss = sum(final) / len(final)
        r["final_loss"] = final_loss
        r["spikes"] = count_spikes(r["losses"])
        print(f"{name:<16} {final_loss:>12.4g} {r['spikes']:>12d} {r['time']:>9.1f}s")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lstm_clipping.png")
    plot(results, path)
    print(f"wrote {path}")
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name, r in results.items():
        top.plot([x if math.isfinite(x) else float("nan") for x in r["losses"]], lw=0.8,
                 label=name)
        bottom.plot(r["norms"], lw=0.8, label=name)
    top.set_yscale("log")
    top.set_ylabel("training loss (MSE)")
    bottom.set_yscale("log")
    bottom.set_ylabel("gradient norm before clipping")
    bottom.set_xlabel("step")
    top.legend(fontsize=8)
    top.set_title("LSTM on sine waves, high learning rate: clipping recipes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
