#!/usr/bin/env python
"""The MoFO paper's 2-D example (Section 4): why MoFO stops closer to the pre-trained point.

Pre-training loss ``L_pre = θ1² + θ2²`` (minimum, the "pre-trained model", at (0, 0)).
Fine-tuning loss ``L_ft = (θ1 − 1)² (θ2 − 1)²``: every point of the lines θ1 = 1 and θ2 = 1 is
a global minimum. Starting at (0, 0), Adam moves both coordinates alike and ends at (1, 1)
(pre-training loss 2); MoFO with alpha = 0.5 on the single 2-entry tensor updates one
coordinate per step (the one with the larger |momentum|; the first step's tie goes to the
lower index, θ1) and ends at (1, 0) (pre-training loss 1).

    python benchmarks/toy2d.py [--out DIR] [--steps N] [--lr LR]

Prints both end points and writes ``toy2d.png`` (both trajectories over the loss landscape).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import maskopt  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

STEPS = 2000
LR = 0.02


def finetune_loss(theta: torch.Tensor) -> torch.Tensor:
    return (theta[0] - 1) ** 2 * (theta[1] - 1) ** 2


def pretrain_loss(theta: torch.Tensor) -> torch.Tensor:
    return theta[0] ** 2 + theta[1] ** 2


def trajectory(method: str, steps: int = STEPS, lr: float = LR) -> torch.Tensor:
    """Points visited from (0, 0): a ``(steps + 1, 2)`` float64 tensor.

    ``method``: ``"adam"`` (``torch.optim.Adam``) or ``"mofo"`` (``maskopt.MoFO``, alpha=0.5).
    Both use the same lr with a cosine decay to 0, betas (0.9, 0.999), eps 1e-8.
    """
    theta = torch.zeros(2, dtype=torch.float32, requires_grad=True)
    if method == "adam":
        opt = torch.optim.Adam([theta], lr=lr)
    elif method == "mofo":
        from maskopt import MoFO

        opt = MoFO([theta], lr=lr, alpha=0.5)
    else:
        raise ValueError(f"method must be 'adam' or 'mofo', got {method!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    points = [theta.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        finetune_loss(theta).backward()
        opt.step()
        sched.step()
        points.append(theta.detach().clone())
    return torch.stack(points)


def plot(path: Path, adam: torch.Tensor, mofo: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.linspace(-0.3, 1.5, 241, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    ft = (X - 1) ** 2 * (Y - 1) ** 2
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=90)
    cs = ax.contourf(X, Y, torch.log10(ft + 1e-3), levels=20, cmap="Blues_r", alpha=0.8)
    fig.colorbar(cs, ax=ax, label="log10 fine-tuning loss")
    ax.contour(X, Y, X**2 + Y**2, levels=[0.25, 1, 2], colors="0.35", linestyles="--", linewidths=0.8)
    ax.axvline(1, color="k", lw=0.6)
    ax.axhline(1, color="k", lw=0.6)
    ax.plot(adam[:, 0], adam[:, 1], color="C1", lw=2, label=f"Adam → ({adam[-1, 0]:.2f}, {adam[-1, 1]:.2f})")
    ax.plot(
        mofo[:, 0], mofo[:, 1], color="C2", lw=2, label=f"MoFO α=0.5 → ({mofo[-1, 0]:.2f}, {mofo[-1, 1]:.2f})"
    )
    ax.scatter([0], [0], c="k", zorder=5, label="pre-trained θ0 = (0, 0)")
    ax.scatter(
        [adam[-1, 0], mofo[-1, 0]], [adam[-1, 1], mofo[-1, 1]], c=["C1", "C2"], zorder=5, edgecolors="k"
    )
    ax.set_xlabel("θ1")
    ax.set_ylabel("θ2")
    ax.set_title("L_ft = (θ1−1)²(θ2−1)²; dashed: L_pre = θ1²+θ2²", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default=str(HERE / "out"), help="output directory for toy2d.png")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate (cosine decay to 0)")
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error(f"--steps must be a positive integer, got {args.steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be finite and > 0, got {args.lr}")
    torch.set_num_threads(1)  # two numbers: threads only add overhead
    adam = trajectory("adam", args.steps, args.lr)
    mofo = trajectory("mofo", args.steps, args.lr)
    for name, tr in (("Adam", adam), ("MoFO (alpha=0.5)", mofo)):
        end = tr[-1]
        print(
            f"{name:<17} ends at ({end[0]:.4f}, {end[1]:.4f}): fine-tuning loss "
            f"{float(finetune_loss(end)):.2e}, pre-training loss {float(pretrain_loss(end)):.3f}, "
            f"distance from θ0 {float(end.norm()):.3f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "toy2d.png", adam, mofo)
    print(f"wrote {out / 'toy2d.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
