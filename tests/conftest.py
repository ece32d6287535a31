"""Session set-up shared by all test modules."""

import os
import sys


def _import_triton_for_the_interpreter() -> None:
    """Triton decides at import whether its own ``tl`` helpers run under the interpreter
    (TRITON_INTERPRET=1), so a module that imports Triton first without it (torch.compile
    does, through Inductor) would break the kernel tests' interpreter runs on a CPU-only
    machine. Import it here in interpreter mode, then give the variable back."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available() or "triton" in sys.modules:
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_for_the_interpreter()


import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: they gain nothing from more, and on a
    shared 2-core machine OpenMP spinning under contention makes a 30 ms step take seconds."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
