"""Model sizes of the forgetting benchmark and their pre-trained checkpoints.

A checkpoint is two files in ``benchmarks/checkpoints/``: ``<size>.pt`` (the state dict in
float16) and ``<size>.json`` (its recipe: shape, command, steps, held-out losses, the
pre-training curve, the corpus digest and Python version, and the sha256 of the ``.pt``).
Loading checks the file against that sha256, so a truncated or replaced file is refused
with the command that rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
STORAGE_DTYPE = torch.float16


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A byte-level Llama (vocabulary 256, untied embeddings) and how it is pre-trained."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    pretrain_lr: float  # peak lr; divided by PLATEAU_LR_DIVISOR at each plateau
    pretrain_max_steps: int  # a safety cap; the plateau rule normally stops earlier


# 0.04 M to 2.3 M parameters (56x apart): the size axis a 2-core CPU can pre-train and sweep.
# All four are shipped; "cpu" is the default, the one `make demo` loads.
SIZES = {
    "micro": ModelShape(
        hidden=32, layers=2, heads=2, intermediate=88, seq=128, pretrain_lr=3e-3, pretrain_max_steps=20000
    ),
    "tiny": ModelShape(
        hidden=64, layers=2, heads=4, intermediate=176, seq=128, pretrain_lr=3e-3, pretrain_max_steps=20000
    ),
    "cpu": ModelShape(
        hidden=128, layers=4, heads=4, intermediate=352, seq=128, pretrain_lr=3e-3, pretrain_max_steps=12000
    ),
    "large": ModelShape(
        hidden=192, layers=5, heads=6, intermediate=512, seq=128, pretrain_lr=2e-3, pretrain_max_steps=12000
    ),
}
DEFAULT_SIZE = "cpu"


def rebuild_command(size: str) -> str:
    return f"python benchmarks/forgetting.py --pretrain --size {size} --threads 1"


def build_model(shape: ModelShape, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.seq,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def parameter_count(shape: ModelShape) -> int:
    return sum(p.numel() for p in build_model(shape, 0).parameters())


def checkpoint_paths(size: str, directory: Path = CHECKPOINT_DIR) -> tuple[Path, Path]:
    return directory / f"{size}.pt", directory / f"{size}.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(model, size: str, recipe: dict, directory: Path = CHECKPOINT_DIR) -> dict:
    """Write ``<size>.pt`` (float16) and ``<size>.json``; returns the recipe with the file's sha256."""
    pt, _ = checkpoint_paths(size, directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", STORAGE_DTYPE).contiguous() for k, v in model.state_dict().items()}
    tmp = pt.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, pt)
    recipe = dict(
        recipe,
        file=pt.name,
        sha256=sha256_of(pt),
        bytes=pt.stat().st_size,
        storage_dtype=str(STORAGE_DTYPE).replace("torch.", ""),
    )
    save_recipe(size, recipe, directory)
    return recipe


def save_recipe(size: str, recipe: dict, directory: Path = CHECKPOINT_DIR) -> None:
    _, meta = checkpoint_paths(size, directory)
    tmp = meta.with_suffix(f".tmp{os.getpid()}")
    # One line per key keeps the pre-training curve readable in a diff.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in recipe.items()]
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(tmp, meta)


def load_recipe(size: str, directory: Path = CHECKPOINT_DIR) -> dict:
    _, meta = checkpoint_paths(size, directory)
    if not meta.is_file():
        raise CheckpointError(
            f"no pre-trained checkpoint for --size {size}: {meta} is missing. "
            f"Build it with: {rebuild_command(size)}"
        )
    return json.loads(meta.read_text())


def load_checkpoint(size: str, directory: Path = CHECKPOINT_DIR):
    """The pre-trained model (float32) and its recipe; refuses a missing or altered file."""
    recipe = load_recipe(size, directory)
    pt, _ = checkpoint_paths(size, directory)
    if not pt.is_file():
        raise CheckpointError(
            f"the checkpoint file {pt} is missing (its recipe {pt.with_suffix('.json').name} is "
            f"there). Rebuild it with: {rebuild_command(size)}"
        )
    digest = sha256_of(pt)
    if digest != recipe["sha256"]:
        raise CheckpointError(
            f"the checkpoint file {pt} has sha256 {digest}, but its recipe expects "
            f"{recipe['sha256']}: the file is damaged or from another build. Rebuild it with: "
            f"{rebuild_command(size)}"
        )
    shape = SIZES[size]
    if recipe["shape"] != dataclasses.asdict(shape):
        raise CheckpointError(
            f"the checkpoint {pt} was built for shape {recipe['shape']}, but --size {size} is now "
            f"{dataclasses.asdict(shape)}. Rebuild it with: {rebuild_command(size)}"
        )
    model = build_model(shape, seed=0)
    state = torch.load(pt, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model, recipe


def corpus_note(recipe: dict, code_digest: str) -> str | None:
    """A warning when this Python's stdlib differs from the one the checkpoint was trained on."""
    if recipe.get("corpus_digest") == code_digest:
        return None
    here = ".".join(map(str, sys.version_info[:3]))
    return (
        f"note: this Python's standard library ({here}, code digest {code_digest}) differs from "
        f"the one the checkpoint was pre-trained on (Python {recipe.get('python')}, digest "
        f"{recipe.get('corpus_digest')}); the model loads, but held-out losses will differ from "
        f"the recipe's and the held-out split may overlap its training data."
    )
