"""The tiny models of the test suite, their token data and their training loops.

- ``TinyLlama`` / ``toy_llama``: a Llama-named toy model without transformers
  (``model.layers.<i>.self_attn.q_proj`` and friends, so that HFT finds the layers and categories).
- ``tiny_llama``, ``tiny_qwen2``, ... : random-init transformers models (width 32, vocab 96);
  a test that builds one is skipped where transformers is not installed.
- ``TokenData``: a causal-LM token dataset for the Hugging Face Trainer; ``token_ids``: one batch.

The builder functions seed torch's global generator themselves, so a model depends only on
its arguments; ``TinyLlama(...)`` draws from the generator as it stands.
"""

import pytest
import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn, self.mlp = Attention(d), MLP(d)
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Llama parameter names, a few thousand parameters."""

    def __init__(self, d=16, layers=4, vocab=50):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Layer(d) for _ in range(layers))
        self.model.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def toy_llama(seed=0, vocab=16):
    """``TinyLlama(d=8, layers=2)``: the model of the conformance, hardening and DDP tests."""
    torch.manual_seed(seed)
    return TinyLlama(d=8, layers=2, vocab=vocab)


def token_ids(seed=0, vocab=16, shape=(2, 6)):
    """One fixed batch of token ids in ``[0, vocab)``."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def train_toy(model, opt, steps, start=0, vocab=16):
    """``steps`` steps of the toy's LM loss (labels = inputs) on ``token_ids(s)`` for
    s = start, start + 1, ...: the batch depends on the step, so a resumed run sees the same data."""
    for s in range(start, start + steps):
        ids = token_ids(s, vocab)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


class TokenData(torch.utils.data.Dataset):
    """``n`` fixed random sequences of token ids in ``[low, vocab)``; labels = inputs."""

    def __init__(self, n=8, vocab=64, seq=12, low=0):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(low, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# -- transformers models ---------------------------------------------------------------------------


def _transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _causal(config, seed=0):
    torch.manual_seed(seed)
    return _transformers().AutoModelForCausalLM.from_config(config)


def tiny_llama(layers=4, kv_heads=4, *, seed=0, vocab=96, hidden=32, intermediate=64, **config):
    """``LlamaForCausalLM``; ``config``: further ``LlamaConfig`` fields (token ids, ...)."""
    return _causal(
        _transformers().LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            **config,
        ),
        seed,
    )


def tiny_qwen2(layers=4):
    return _causal(
        _transformers().Qwen2Config(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def tiny_mistral(layers=4):
    return _causal(
        _transformers().MistralConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
        )
    )


def tiny_gpt2(layers=4):
    return _causal(
        _transformers().GPT2Config(
            vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )


def tiny_neox(layers=4):
    return _causal(
        _transformers().GPTNeoXConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
        )
    )


def tiny_bert(layers=3):
    transformers = _transformers()
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
        )
    )


def tiny_mixtral(layers=4):
    return _causal(
        _transformers().MixtralConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    )


def tiny_qwen2_moe(layers=4):
    return _causal(
        _transformers().Qwen2MoeConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
        )
    )


def causal_lm_ids():
    """The one batch the transformers models train on: 2 sequences of 12 token ids."""
    return token_ids(vocab=96, shape=(2, 12))


def train_causal_lm(model, opt, steps=3):
    """``steps`` steps of a transformers model's own LM loss on ``causal_lm_ids()``."""
    ids = causal_lm_ids()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
