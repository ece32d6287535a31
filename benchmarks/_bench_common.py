"""Helpers of benchmarks/step_bench.py: parameter lists, baselines, timing, memory, metadata."""

from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------- shapes


def llama_shapes(
    *, vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, tie=False
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama model's parameters in model.named_parameters() order.

    The defaults are TinyLlama-1.1B (1,100,048,384 parameters in 201 tensors)."""
    kv = hidden // heads * kv_heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        out += [
            (pre + "self_attn.q_proj.weight", (hidden, hidden)),
            (pre + "self_attn.k_proj.weight", (kv, hidden)),
            (pre + "self_attn.v_proj.weight", (kv, hidden)),
            (pre + "self_attn.o_proj.weight", (hidden, hidden)),
            (pre + "mlp.gate_proj.weight", (intermediate, hidden)),
            (pre + "mlp.up_proj.weight", (intermediate, hidden)),
            (pre + "mlp.down_proj.weight", (hidden, intermediate)),
            (pre + "input_layernorm.weight", (hidden,)),
            (pre + "post_attention_layernorm.weight", (hidden,)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tie:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def tiny_llama_quick():
    """A scaled-down Llama (same tensor kinds, ~0.3M params) for --quick runs on CPU."""
    return llama_shapes(vocab=512, hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2)


def sweep_shapes(n_params: int) -> list[tuple[str, tuple[int, ...]]]:
    """About ``n_params`` parameters as Llama-like layers (hidden 2048) once past 64M; below,
    a handful of square matrices (so every size has several tensors of mixed shapes)."""
    if n_params >= 64 * 2**20:
        per_layer = numel(llama_shapes(vocab=0, layers=1)) - 2048  # 44M: TinyLlama's layer
        layers = max(1, round(n_params / per_layer))
        shapes = llama_shapes(vocab=0, layers=layers)
        return [(n, s) for n, s in shapes if math.prod(s) > 0]
    side = max(8, int(math.sqrt(n_params / 4)))
    return [(f"layers.{i}.weight", (side, side)) for i in range(4)] + [
        (f"layers.{i}.bias", (side,)) for i in range(4)
    ]


def numel(shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


# ----------------------------------------------------------------------------------- baselines


class LoopTopkMoFO(torch.optim.Optimizer):
    """The official MoFO implementation's step *pattern*, re-implemented for the benchmark.

    A Python loop over tensors; per tensor the Adam moments, ``torch.topk`` of |m| for the
    k-th largest value, the mask ``|m| >= kth`` (every tie at the boundary selected), weight
    decay on every entry, then the masked update. Written from the MoFO paper's Algorithm 1
    as a timing baseline; it is not maskopt's semantics (exactly k, lowest-index ties)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, alpha=0.1):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, alpha = group["lr"], group["eps"], group["weight_decay"], group["alpha"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.mul_(1 - lr * wd)
                score = m.abs().view(-1)
                k = max(1, int(alpha * score.numel()))
                kth = torch.topk(score, k, sorted=False).values.min()
                mask = m.abs() >= kth
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                p.addcdiv_(m * mask, denom, value=-lr / (1 - beta1**t))
        return None


# ----------------------------------------------------------------------------------- bytes


def sector_fraction(alpha: float, elt_bytes: int) -> float:
    """Share of 32-byte sectors holding at least one selected entry (selection spread evenly)."""
    per = max(1, 32 // elt_bytes)
    return 1.0 - (1.0 - alpha) ** per


def minimal_bytes(method: str, n: int, alpha: float, p_bytes: int, trainable: float = 1.0) -> float:
    """Bytes one step of ``method`` must move at least (the sector count of docs/kernels.md).

    AdamW: read p, g, m, v; write p, m, v. MoFO: the moments pass (read g, m, v; write m, v)
    plus the masked apply (read the key |m| or |g| again, then v and p in, p out for the
    sectors that hold a selected entry; 2-byte moments for ``bf16m``). RandomBCD: the moments
    pass plus p in/out for the selected sectors (the mask is computed, not read). HalfAdam:
    AdamW on its trainable share.
    """
    g_b, mv = p_bytes, 2 if "bf16m" in method else 4
    adamw = n * (2 * p_bytes + g_b + 4 * mv)
    moments = n * (g_b + 4 * mv)
    if method.startswith("AdamW"):
        return adamw
    if method.startswith("HalfAdam"):
        return adamw * trainable
    if method.startswith("RandomBCD"):
        return moments + n * sector_fraction(alpha, p_bytes) * 2 * p_bytes
    key = g_b if "gradient" in method else mv
    return moments + n * (key + sector_fraction(alpha, p_bytes) * (mv + 2 * p_bytes))


# ----------------------------------------------------------------------------------- timing


def bench(fn, device: torch.device, *, warmup_ms=25.0, rep_ms=100.0, cpu_reps=5, cpu_warmup=1) -> float:
    """Median milliseconds of ``fn()``; warm-up excluded. CUDA: triton.testing.do_bench."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    for _ in range(cpu_warmup):
        fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured device copy bandwidth in GB/s (read + write counted) of an ``nbytes`` buffer."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    ms = bench(copy, device, cpu_reps=5)
    del copy, src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def step_memory(step, device: torch.device) -> float | None:
    """Peak extra bytes allocated during one ``step()`` (CUDA only), in bytes."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated(device) - base)


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


# ----------------------------------------------------------------------------------- metadata


def _git(*args) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        return ""


def metadata(device: torch.device) -> dict:
    import maskopt

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    # A copy of the tree without .git (a lent GPU machine) passes the commit in MASKOPT_COMMIT.
    commit = os.environ.get("MASKOPT_COMMIT") or _git("rev-parse", "--short", "HEAD") or "no-commit"
    if not os.environ.get("MASKOPT_COMMIT") and _git("status", "--porcelain"):
        commit += "+dirty"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda or ""
    else:
        name = platform.processor() or platform.machine()
        cuda = ""
    return dict(
        device=name,
        device_type=device.type,
        torch=torch.__version__,
        triton=triton_version,
        cuda=cuda,
        maskopt=getattr(maskopt, "__version__", "?"),
        commit=commit,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        interpreter=os.environ.get("TRITON_INTERPRET", "0"),
    )


def quiet_warnings():
    warnings.filterwarnings("ignore", message="HalfAdam got parameters without names")
