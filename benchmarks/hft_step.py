"""HFT on CPU: training-step time (forward + backward + step) and optimizer-state memory of
HalfAdam against torch.optim.AdamW, on a small Llama-style model built from a transformers
config (random init, nothing downloaded).

    python benchmarks/hft_step.py                       # hidden 512, 4 layers, batch 4 x 128 tokens
    python benchmarks/hft_step.py --hidden 256 --layers 2 --steps 5   # quick
    python benchmarks/hft_step.py --fractions          # real trainable fractions of real-size configs

Variants, all on the same model and batch, measured interleaved (round-robin, one step of each
per round) so that load from other processes hits them alike; the median per phase is printed,
in CPU time of this process (robust to other load on a shared machine) and wall time:

    adamw                  torch.optim.AdamW(foreach=True), all parameters (full fine-tuning)
    halfadam               HalfAdam(model.named_parameters()), freeze="requires_grad" (default)
    halfadam-mask          HalfAdam(..., freeze="mask"): frozen half still gets gradients
    adamw+freeze_half      maskopt.hft.freeze_half(model) then a stock AdamW over the trainable half

Also: the optimizer state (bytes of exp_avg/exp_avg_sq/step) after one step, and the
trainable fractions from the plan.

``--fractions`` builds real-size configs (Llama-2-7B, Mistral-7B, Qwen2-7B, GPT-2, Pythia-1B,
BERT-base, Mixtral-8x7B, Qwen1.5-MoE-A2.7B) on the meta device (no memory, nothing downloaded)
and prints the exact trainable share of the layer parameters that the category rule gives
(count rule over 20 seeds, and balance="numel").
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch


def build(args):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 8 / 3 // 64 * 64),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.float().train()


REAL_CONFIGS = {
    # name: (config class, kwargs) -- published sizes, typed in (nothing downloaded)
    "Llama-2-7B": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
    ),
    "TinyLlama-1.1B": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
    ),
    "Mistral-7B": (
        "MistralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
    ),
    "Qwen2-7B": (
        "Qwen2Config",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
    ),
    "GPT-2 (124M)": (
        "GPT2Config",
        dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    ),
    "Pythia-1B": (
        "GPTNeoXConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=8,
            vocab_size=50304,
        ),
    ),
    "BERT-base": (
        "BertConfig",
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            vocab_size=30522,
        ),
    ),
    "Mixtral-8x7B": (
        "MixtralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
        ),
    ),
    "Qwen1.5-MoE-A2.7B": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=60,
            num_experts_per_tok=4,
            vocab_size=151936,
        ),
    ),
}


def fractions(seeds: int = 20) -> None:
    import transformers

    from maskopt.hft import plan_half

    transformers.logging.set_verbosity_error()
    print(
        f"| model | params | in layers | layers trainable, count rule (seed 0; min-max over {seeds} seeds) "
        '| attention (min-max) | layers trainable, balance="numel" | all params trainable (seed 0) |'
    )
    print("|---|---|---|---|---|---|---|")
    for name, (cls, kw) in REAL_CONFIGS.items():
        cfg = getattr(transformers, cls)(**kw)
        with torch.device("meta"):
            if cls == "BertConfig":
                model = transformers.BertForMaskedLM(cfg)
            else:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
        plans = [plan_half(model, seed=s) for s in range(seeds)]
        lay = [p.trainable_fraction("layers") for p in plans]
        att = [p.trainable_fraction("attention") for p in plans]
        bal = plan_half(model, seed=0, balance="numel").trainable_fraction("layers")
        c = plans[0].counts()
        print(
            f"| {name} | {c['all'][1] / 1e9:.2f}B | {c['layers'][1] / c['all'][1]:.1%} | {lay[0]:.2%} "
            f"({min(lay):.2%}-{max(lay):.2%}) | {min(att):.1%}-{max(att):.1%} | {bal:.2%} "
            f"| {plans[0].trainable_fraction('all'):.2%} |"
        )


def state_bytes(opt) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=0, help="default: 8/3 hidden rounded down to 64")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (each variant steps once per round)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--fractions", action="store_true", help="print real-size trainable fractions and exit")
    args = ap.parse_args()
    if args.fractions:
        fractions()
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from maskopt import HalfAdam
    from maskopt.hft import freeze_half

    base = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    lr = 1e-5

    variants = {}
    m = copy.deepcopy(base)
    variants["adamw"] = (m, torch.optim.AdamW(m.parameters(), lr=lr, foreach=True))
    m = copy.deepcopy(base)
    variants["halfadam"] = (m, HalfAdam(m.named_parameters(), lr=lr, ratio=args.ratio))
    m = copy.deepcopy(base)
    variants["halfadam-mask"] = (m, HalfAdam(m.named_parameters(), lr=lr, ratio=args.ratio, freeze="mask"))
    m = copy.deepcopy(base)
    plan = freeze_half(m, ratio=args.ratio)
    variants["adamw+freeze_half"] = (
        m,
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, foreach=True),
    )

    # CPU time (time.process_time) is the primary figure: on a shared machine the wall time of a
    # step depends on what else runs, while the CPU time our process burns does not (much).
    keys = ("forward", "backward", "step", "total", "wall")
    phases = {name: {k: [] for k in keys} for name in variants}
    for i in range(args.warmup + args.steps):
        for name, (model, opt) in variants.items():
            opt.zero_grad(set_to_none=True)
            w0, t0 = time.perf_counter(), time.process_time()
            loss = model(input_ids=ids, labels=ids).loss
            t1 = time.process_time()
            loss.backward()
            t2 = time.process_time()
            opt.step()
            t3, w3 = time.process_time(), time.perf_counter()
            if i >= args.warmup:
                rec = phases[name]
                for k, v in zip(keys, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, w3 - w0), strict=True):
                    rec[k].append(v)

    med = {name: {k: statistics.median(v) for k, v in rec.items()} for name, rec in phases.items()}
    mem = {name: state_bytes(opt) for name, (_, opt) in variants.items()}
    c = plan.counts()
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={torch.get_num_threads()}"
    )
    print(
        f"# model: Llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} vocab={args.vocab}, "
        f"{n_params / 1e6:.2f}M params ({c['layers'][1] / n_params:.1%} in the layers); batch {args.batch} x {args.seq} tokens"
    )
    print(
        f"# HFT ratio={args.ratio}: layers trainable {plan.trainable_fraction('layers'):.2%}, "
        f"all parameters trainable {plan.trainable_fraction('all'):.2%}"
    )
    print(
        f"# median of {args.steps} interleaved steps after {args.warmup} warm-up; CPU ms (process time) per phase, "
        "and the wall time of the whole step"
    )
    print(
        f"{'variant':18s} {'forward':>8s} {'backward':>8s} {'step':>7s} {'total':>8s} {'vs adamw':>8s} "
        f"{'wall':>8s} {'vs adamw':>8s} {'state MiB':>9s} {'vs adamw':>8s}"
    )
    ref, ref_w, ref_m = med["adamw"]["total"], med["adamw"]["wall"], mem["adamw"]
    for name in variants:
        r = med[name]
        print(
            f"{name:18s} {r['forward'] * 1e3:8.1f} {r['backward'] * 1e3:8.1f} {r['step'] * 1e3:7.1f} "
            f"{r['total'] * 1e3:8.1f} {r['total'] / ref:8.3f} {r['wall'] * 1e3:8.1f} {r['wall'] / ref_w:8.3f} "
            f"{mem[name] / 2**20:9.2f} {mem[name] / ref_m:8.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    args=vars(args),
                    median_s=med,
                    state_bytes=mem,
                    layers_fraction=plan.trainable_fraction("layers"),
                    all_fraction=plan.trainable_fraction("all"),
                    torch=torch.__version__,
                    threads=torch.get_num_threads(),
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
