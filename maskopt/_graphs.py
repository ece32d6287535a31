"""Whether a step is being captured into a CUDA graph: the one question the optimizer's plan and
the kernels' launcher both ask before anything that a graph cannot hold (a synchronous copy, a
new address table)."""

from __future__ import annotations

import torch


def stream_capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (False without CUDA,
    and while torch.compile traces a step, as torch's own optimizers answer)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:  # a build of torch without CUDA
        return False
