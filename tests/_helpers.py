"""Helpers shared by test modules in several folders (the models and their data are in
_tiny_models.py)."""

import socket

import torch


def snapshot(model):
    """Detached copies of the parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def stable_topk_mask(scores, k):
    """The k largest entries, ties to the lowest flat index (a stable sort): a top-k written
    independently of maskopt's selection, to check it against."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.sort(-flat, stable=True).indices[:k]] = True
    return mask.view(scores.shape)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_accelerate_state():
    """Forget accelerate's process-global state, as a new process would have none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
