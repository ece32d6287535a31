"""The compiled CPU step: masked AdamW with the exact selection, in C++ (``csrc/cpu_step.cpp``).

On the CPU the optimizer step is the hot path whenever the optimizer lives in host memory
(DeepSpeed ZeRO-Offload, CPU training). This module builds ``csrc/cpu_step.cpp`` on first use
with the system's C++ compiler (no torch headers: about a second), caches the library per
source, flags and CPU, and steps float32 tensors through it with ctypes. Where no compiler
is found or the build fails, it warns once and the PyTorch path (``maskopt.pytorch_path``)
takes every tensor.

Rounding: every operation rounds as in ``torch.optim.AdamW(fused=True)`` on the CPU (at
``alpha = 1`` the parameters are bitwise equal to it). Against the PyTorch path, whose foreach
ops are those of ``AdamW(foreach=True)``, moments and masks are bitwise equal; a parameter can
differ in its last bits because torch's CPU ``sqrt`` (Intel MKL's vector math) is not
correctly rounded in about one entry in five, and this step's is (docs/performance.md).

Environment:
    MASKOPT_CPU_STEP=0   take the PyTorch path instead (no build, no warning)
    MASKOPT_CACHE_DIR    where built libraries are kept (default ``~/.cache/maskopt``)
    CXX                  the compiler (default ``c++``)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _hash
from .policy import SelectionPolicy
from .selection import RANDOM, RANDOM_EXACT, TOPK_GRADIENT, TOPK_MOMENTUM, topk_count

if TYPE_CHECKING:
    from .distributed import Shard

__all__ = ["available", "build_error", "takes_cpu_step", "masked_adam_cpu_"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_step.cpp"
_ABI = 3
# Chunks (of 2**17 entries) whose top-bit histograms a top-k step holds at once, 16 KiB each:
# tensors are stepped in waves of about 2**26 entries, so the extra memory stays at 8 MiB.
WAVE_CHUNKS = 512

# Kinds and decay modes of csrc/cpu_step.cpp.
_KIND_ALL, _KIND_GIVEN, _KIND_MOMENTS, _KIND_DIGITS, _KIND_ABOVE_KEY = 0, 5, 6, 7, 8
_KINDS = {TOPK_MOMENTUM: 1, TOPK_GRADIENT: 2, RANDOM: 3, RANDOM_EXACT: 4}
_NO_DECAY, _DECAY_SELECTED, _DECAY_ALL = 0, 1, 2

# Tried in order: the first that builds is kept. Without OpenMP the step runs on one thread;
# without -march=native, with the compiler's baseline vector width.
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
_FLAG_SETS = [
    [*_BASE_FLAGS, "-march=native", "-fopenmp"],
    [*_BASE_FLAGS, "-fopenmp"],
    _BASE_FLAGS,
]


_TENSOR_FIELDS: list[tuple[str, Any]] = [
    ("param", ctypes.c_void_p),
    ("grad", ctypes.c_void_p),
    ("exp_avg", ctypes.c_void_p),
    ("exp_avg_sq", ctypes.c_void_p),
    ("indices", ctypes.c_void_p),
    ("numel", ctypes.c_int64),
    ("index_count", ctypes.c_int64),
    ("index_offset", ctypes.c_int64),
    ("step_size", ctypes.c_float),
    ("bias_correction2_sqrt", ctypes.c_float),
    ("hash_key", ctypes.c_uint32),
    ("pad", ctypes.c_uint32),
    ("key_prefix", ctypes.c_int64),
    ("ties_to_take", ctypes.c_int64),
    ("histogram", ctypes.c_void_p),
]


class _TensorArgs(ctypes.Structure):
    _fields_ = _TENSOR_FIELDS


class _Config(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("decay_mode", ctypes.c_int32),
        ("has_grad_scale", ctypes.c_int32),
        ("block_size", ctypes.c_int64),
        ("wave_chunks", ctypes.c_int64),
        ("score_kind", ctypes.c_int32),
        ("digit_high", ctypes.c_int32),
        ("digit_low", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("alpha", ctypes.c_double),
        ("hash_threshold", ctypes.c_uint64),
        ("lerp_weight", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("grad_scale", ctypes.c_float),
    ]


# The same layout as a NumPy record, to fill the per-tensor arguments column by column.
_TENSOR_RECORD = np.dtype(
    {
        "names": [name for name, _ in _TENSOR_FIELDS],
        "formats": ["u8"] * 5 + ["i8"] * 3 + ["f4"] * 2 + ["u4"] * 2 + ["i8"] * 2 + ["u8"],
        "offsets": [getattr(_TensorArgs, name).offset for name, _ in _TENSOR_FIELDS],
        "itemsize": ctypes.sizeof(_TensorArgs),
    }
)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
_loaded = False


def _cache_dir() -> Path:
    given = os.environ.get("MASKOPT_CACHE_DIR")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "maskopt"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another that
    shares the cache directory."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout


def _build() -> ctypes.CDLL:
    """The library, built into the cache if it is not there. Raises RuntimeError with the
    compiler's complaint when no flag set builds."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    source = SOURCE.read_bytes()
    version = _compiler_version(cxx)
    if not version:
        raise RuntimeError(f"the C++ compiler {cxx!r} does not run")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    failures = []
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_signature().encode()])
        ).hexdigest()[:20]
        target = cache / f"cpu_step-{digest}.so"
        if not target.exists():
            # Built under a temporary name and renamed: processes that build at once (pytest
            # workers, ranks of one job) each install a complete file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            result = subprocess.run(
                [cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                os.unlink(tmp)
                failures.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, target)
        library = ctypes.CDLL(str(target))
        if library.maskopt_cpu_step_abi() != _ABI:
            raise RuntimeError(f"{target} reports another ABI version; delete it to rebuild")
        library.maskopt_cpu_step.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(_Config)]
        library.maskopt_cpu_step.restype = ctypes.c_int32
        return library
    raise RuntimeError(f"{cxx} could not build {SOURCE.name}: " + " | ".join(failures))


def _load() -> ctypes.CDLL | None:
    global _library, _error, _loaded
    if _loaded:
        return _library
    with _lock:
        if not _loaded:
            if os.environ.get("MASKOPT_CPU_STEP", "1") == "0":
                _error = "disabled by MASKOPT_CPU_STEP=0"
            else:
                try:
                    _library = _build()
                except (OSError, RuntimeError) as exc:
                    _error = str(exc)
                    warnings.warn(
                        f"maskopt: the compiled CPU step is unavailable ({_error}); CPU tensors take "
                        "the PyTorch path, several times slower (docs/performance.md)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            _loaded = True
    return _library


def available() -> bool:
    """Whether the compiled CPU step can run here (built on the first call; one warning if it
    cannot be built; False under ``MASKOPT_CPU_STEP=0``)."""
    return _load() is not None


def build_error() -> str | None:
    """Why the compiled CPU step is unavailable, or None when it is available (builds it)."""
    _load()
    return _error


def takes_cpu_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    step: torch.Tensor | None,
) -> bool:
    """Whether the compiled CPU step can take this tensor: float32 parameter, gradient and
    moments, all contiguous CPU tensors of one shape, a CPU step counter, outside
    ``torch.compile`` tracing, and the library built.

    Args:
        param: a (local) parameter.
        grad: its gradient.
        exp_avg, exp_avg_sq: its moments (None: not created yet; they will be float32 like
            the parameter when it is).
        step: its step counter (None: not created yet).
    """
    if param.device.type != "cpu" or param.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    for x in (grad, exp_avg, exp_avg_sq):
        if x is None:
            continue
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or x.layout != torch.strided
            or x.shape != param.shape
            or not x.is_contiguous()
        ):
            return False
    if not param.is_contiguous() or (step is not None and step.device.type != "cpu"):
        return False
    return available()


def _config(
    kind: int,
    policy: SelectionPolicy,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    decay_mode: int,
    grad_scale: float | None,
) -> _Config:
    return _Config(
        kind=kind,
        threads=max(1, torch.get_num_threads()),
        decay_mode=decay_mode,
        has_grad_scale=grad_scale is not None,
        block_size=policy.block_size or 0,
        wave_chunks=WAVE_CHUNKS,
        score_kind=_KINDS.get(policy.kind, 0),
        alpha=policy.alpha,
        hash_threshold=_hash.threshold(policy.alpha),
        lerp_weight=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        eps=eps,
        decay=decay,
        grad_scale=1.0 if grad_scale is None else grad_scale,
    )


def _run(library: ctypes.CDLL, records: np.ndarray, config: _Config) -> None:
    if len(records) == 0:
        return
    status = library.maskopt_cpu_step(records.ctypes.data, len(records), ctypes.byref(config))
    if status != 0:  # pragma: no cover - the kinds above are the library's
        raise RuntimeError(f"maskopt: the compiled CPU step refused kind {config.kind}")


def masked_adam_cpu_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    policy: SelectionPolicy,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    mask_weight_decay: bool,
    tensor_indices: Sequence[int],
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    shards: Sequence[Shard | None] | None = None,
) -> None:
    """One masked-AdamW step (docs/semantics.md) in place, on tensors that
    :func:`takes_cpu_step` accepted: the arguments of
    :func:`maskopt.pytorch_path.masked_adam_`.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, state_steps: per-tensor lists of contiguous
            float32 CPU tensors (one-element step counters).
        policy: the ``SelectionPolicy`` shared by all the tensors.
        lr, beta1, beta2, eps, weight_decay, mask_weight_decay: the AdamW hyperparameters.
        tensor_indices: each tensor's index in its optimizer (keys the random masks).
        grad_scale, found_inf: GradScaler's one-element tensors, or None.
        shards: per tensor, a ``maskopt.distributed.Shard`` when it is the local shard of a
            larger tensor, else None. A selection over a whole sharded tensor (top-k, exact
            random) is computed across the shards by ``maskopt.distributed``, between the
            compiled moment update and the compiled parameter update.
    """
    library = _load()
    if library is None:
        raise RuntimeError(f"maskopt: the compiled CPU step is unavailable: {_error}")
    if not params:
        return
    if found_inf is not None and bool(found_inf.item()):
        return  # GradScaler found inf/nan: a skipped step changes nothing, counters included.
    scale = None if grad_scale is None else float(grad_scale.item())

    torch._foreach_add_(state_steps, 1)
    steps = [float(s) for s in torch.stack([s.reshape(()) for s in state_steps]).tolist()]
    records = np.zeros(len(params), dtype=_TENSOR_RECORD)
    records["param"] = [p.data_ptr() for p in params]
    records["grad"] = [g.data_ptr() for g in grads]
    records["exp_avg"] = [m.data_ptr() for m in exp_avgs]
    records["exp_avg_sq"] = [v.data_ptr() for v in exp_avg_sqs]
    records["numel"] = [p.numel() for p in params]
    # Python's doubles rounded to float32 as torch rounds a Scalar for a float32 kernel.
    records["step_size"] = [-lr / (1 - beta1**t) for t in steps]
    records["bias_correction2_sqrt"] = [(1 - beta2**t) ** 0.5 for t in steps]
    if policy.is_random and not policy.moves_all:
        records["hash_key"] = [
            _hash.stream_key(policy.seed, index, policy.hash_counter(t))
            for index, t in zip(tensor_indices, steps, strict=True)
        ]
    sharded = shards is not None and any(s is not None for s in shards)
    if sharded and policy.kind == RANDOM:
        assert shards is not None
        records["index_offset"] = [0 if s is None else s.offset for s in shards]

    decay_mode = _NO_DECAY if not weight_decay else (_DECAY_SELECTED if mask_weight_decay else _DECAY_ALL)
    hyper: dict[str, Any] = dict(
        beta1=beta1, beta2=beta2, eps=eps, decay=1 - lr * weight_decay, grad_scale=scale
    )
    torch.autograd.graph.increment_version(params)
    if policy.moves_all:
        _run(library, records, _config(_KIND_ALL, policy, decay_mode=decay_mode, **hyper))
    elif not sharded or policy.kind == RANDOM:
        _run(library, records, _config(_KINDS[policy.kind], policy, decay_mode=decay_mode, **hyper))
    else:
        _across_shards(
            library, records, exp_avgs, grads, steps, policy, tensor_indices, shards, hyper, decay_mode
        )
    torch.autograd.graph.increment_version([*exp_avgs, *exp_avg_sqs])


def _across_shards(
    library, records, exp_avgs, grads, steps, policy, tensor_indices, shards, hyper, decay_mode
):
    """A selection over whole sharded tensors: compiled moments, the selection across the
    shards, the compiled update of what it chose."""
    _run(library, records, _config(_KIND_MOMENTS, policy, decay_mode=decay_mode, **hyper))
    if policy.is_topk and policy.block_size is None and all(s is not None for s in shards):
        _topk_across_shards(library, records, policy, shards, hyper, decay_mode)
        return
    from .pytorch_path import _select

    scale = hyper["grad_scale"]
    grads32 = grads
    if policy.kind == TOPK_GRADIENT and scale is not None:
        grads32 = list(torch._foreach_div(grads, scale))
    selected = _select(policy, exp_avgs, grads32, steps, tensor_indices=tensor_indices, shards=shards)
    keep = []
    for i, idx in enumerate(selected):
        idx = torch.arange(exp_avgs[i].numel()) if idx is None else idx.to(torch.int64).contiguous()
        keep.append(idx)
        records[i]["indices"] = idx.data_ptr()
        records[i]["index_count"] = idx.numel()
    _run(library, records, _config(_KIND_GIVEN, policy, decay_mode=decay_mode, **hyper))
    del keep  # the index tensors lived until the library had read them


def _topk_across_shards(library, records, policy, shards, hyper, decay_mode) -> None:
    """MoFO's top-k over whole sharded tensors with the keys read in C++: the collectives and
    the arithmetic between them are maskopt.distributed's (the same calls as the PyTorch path,
    so ranks on either path agree), the scans over the shards are the library's."""
    from . import distributed

    for members in distributed.shards_by_group(shards).values():
        part = records[members]  # a copy: its pointers and fields are per call
        ks = [topk_count(shards[i].numel, policy.alpha) for i in members]

        def histograms(prefix: torch.Tensor, high: int, low: int, part=part) -> torch.Tensor:
            hist = torch.zeros((len(part), 256), dtype=torch.int64)
            part["key_prefix"] = prefix.numpy()
            part["histogram"] = [hist.data_ptr() + 256 * 8 * t for t in range(len(part))]
            config = _config(_KIND_DIGITS, policy, decay_mode=decay_mode, **hyper)
            config.digit_high, config.digit_low = high, low
            _run(library, part, config)
            return hist

        kth, need, local_equal = distributed.radix_select_across(histograms, shards[members[0]].group, ks, 31)
        take = distributed.ties_to_take(local_equal, need, [shards[i] for i in members], torch.device("cpu"))
        part["key_prefix"] = kth.numpy()
        part["ties_to_take"] = take.numpy()
        _run(library, part, _config(_KIND_ABOVE_KEY, policy, decay_mode=decay_mode, **hyper))
