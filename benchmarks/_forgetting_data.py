"""Corpora for the forgetting benchmark, built only from files every Python install ships.

* pre-training corpus: the standard library's ``.py`` sources (``sysconfig`` ``stdlib`` path),
  without tests, ``site-packages`` and the parts used as fine-tuning / continual tasks;
* fine-tuning corpus: the English reference text in ``pydoc_data/topics.py`` (the text
  ``help('topic')`` prints);
* continual-learning tasks: that English text, then three held-back parts of the standard
  library with distinct styles (codec tables, the ``email`` package, the ``asyncio`` package).

Tokens are bytes (vocabulary 256). Splits are deterministic: every corpus is the
concatenation of its files in sorted path order, cut into 8 KiB chunks, and every 10th chunk
(index % 10 == 9) is held out. Evaluation uses a fixed set of non-overlapping windows evenly
spread over the held-out bytes; training draws random windows from the training bytes with a
seeded generator.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 8192
HELD_OUT_EVERY = 10
SEPARATOR = b"\n\n"

# Directories never read: tests, third-party packages, caches.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

# Held back from pre-training: (task name, stdlib sub-directory). pydoc_data is the
# fine-tuning corpus; the other three are continual-learning tasks.
HELD_BACK = {"pydoc_data": "english", "encodings": "codecs", "email": "email", "asyncio": "asyncio"}
CONTINUAL_TASKS = ("english", "codecs", "email", "asyncio")


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "os.py").is_file():
        raise RuntimeError(f"could not find the Python standard library sources at {path}")
    return path


def _py_files(root: Path, top: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel = Path(dirpath).relative_to(top)
        if rel.parts and (rel.parts[0] in HELD_BACK and root == top):
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if name.endswith(".py"):
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(top).as_posix())


def _join(paths: list[Path]) -> bytes:
    return SEPARATOR.join(p.read_bytes() for p in paths)


def english_text() -> bytes:
    """The English reference text of ``pydoc_data.topics``, topics in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - every CPython ships it
        raise RuntimeError("this Python has no pydoc_data.topics (the fine-tuning corpus)") from e
    return SEPARATOR.join(topics[k].encode("utf-8") for k in sorted(topics))


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # uint8
    held_out: torch.Tensor  # uint8
    files: int
    digest: str

    @property
    def size(self) -> int:
        return self.train.numel() + self.held_out.numel()

    def describe(self) -> str:
        return (
            f"{self.name}: {self.files} file(s), {self.train.numel() / 1e6:.2f} MB train, "
            f"{self.held_out.numel() / 1e6:.2f} MB held out"
        )


def split(name: str, data: bytes, files: int) -> Corpus:
    train, held = bytearray(), bytearray()
    for c, start in enumerate(range(0, len(data), CHUNK)):
        (held if c % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).extend(data[start : start + CHUNK])
    if not held or not train:
        raise RuntimeError(f"corpus {name!r} is too small to split ({len(data)} bytes)")
    digest = hashlib.sha256(data).hexdigest()[:16]
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()  # noqa: E731
    return Corpus(name, as_tensor(train), as_tensor(held), files, digest)


def load_corpora() -> dict[str, Corpus]:
    """``{"code": pre-training, "english": fine-tuning, "codecs", "email", "asyncio"}``."""
    top = stdlib_dir()
    code_files = _py_files(top, top)
    out = {"code": split("code", _join(code_files), len(code_files))}
    out["english"] = split("english", english_text(), 1)
    for sub, task in HELD_BACK.items():
        if task == "english":
            continue
        files = _py_files(top / sub, top) if (top / sub).is_dir() else []
        if not files:
            raise RuntimeError(f"the standard library at {top} has no {sub}/ package (task {task!r})")
        out[task] = split(task, _join(files), len(files))
    return out


def eval_windows(data: torch.Tensor, seq: int, n: int) -> torch.Tensor:
    """``n`` (or fewer, if the data is short) non-overlapping windows of ``seq`` bytes, evenly spread."""
    total = data.numel() // seq
    if total == 0:
        raise RuntimeError(f"held-out data ({data.numel()} bytes) is shorter than one window ({seq})")
    n = min(n, total)
    idx = torch.linspace(0, total - 1, n).round().long()
    starts = idx * seq
    return torch.stack([data[s : s + seq] for s in starts.tolist()]).long()


class Batches:
    """Random training windows from one corpus, reproducible from ``seed``."""

    def __init__(self, data: torch.Tensor, seq: int, batch: int, seed: int):
        if data.numel() <= seq:
            raise RuntimeError(f"training data ({data.numel()} bytes) is shorter than one window")
        self.data, self.seq, self.batch = data, seq, batch
        self.gen = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.data.numel() - self.seq, (self.batch, 1), generator=self.gen)
        return self.data[starts + self._offsets].long()
