"""Helpers shared by test modules in several folders (the models and their data are in
_tiny_models.py)."""

import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp


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


def write_traceback(errors_dir, rank):
    """In a spawned worker's ``except``: leave the traceback where :func:`spawn_ranks` reads it."""
    with open(os.path.join(errors_dir, f"error-rank{rank}.txt"), "w") as f:
        f.write(traceback.format_exc())


def spawn_ranks(worker, args, world, errors_dir, timeout_s, what):
    """Run ``worker(rank, *args)`` in ``world`` spawned processes and wait for them; a worker
    that raises, or a run past ``timeout_s`` seconds, fails the test (with the tracebacks the
    workers left through :func:`write_traceback` in ``errors_dir``), and no process outlives it."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: workers did not finish within {timeout_s} s")
    except mp.ProcessRaisedException:
        errors = sorted(f for f in os.listdir(errors_dir) if f.startswith("error-rank"))
        pytest.fail(f"{what} failed:\n" + "\n".join(open(os.path.join(errors_dir, f)).read() for f in errors))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def exit_without_interpreter_shutdown() -> None:
    """Leave a worker that has finished without the interpreter's shutdown.

    With torch 2.13 and gloo, a worker sometimes aborted at exit ("terminate called without an
    active exception"): its core dump showed a gloo worker thread releasing the tensors of a
    finished all_gather during the shutdown, which needs the GIL, and a thread that asks for
    it then is ended. (DeepSpeed's process groups, and FSDP2's device-mesh groups, are only freed at that point.)"""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
