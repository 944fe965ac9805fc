"""Training data: long documents cut into fixed-length token blocks (cached on disk), NIAH injection, and the
synthetic long-context retrieval task of the CPU memory proof.

Everything is a function of (seed, sample index): a resumed run or another worker sees identical samples.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .niah import TEMPLATES, build_niah_prompt, build_synthetic_tokenizer, generate_haystack_text, make_needle

DATASETS = ("pg19", "text_files", "generated", "passkey")


# --- text sources ---------------------------------------------------------------------------------------------
def iter_pg19_texts(dataset_name: str = "emozilla/pg19", split: str = "train") -> Iterator[str]:
    """Books from PG19 on the Hub, streamed (Colab path; ``emozilla/pg19`` is parquet with a ``text`` column)."""
    from datasets import load_dataset

    for row in load_dataset(dataset_name, split=split, streaming=True):
        yield row["text"]


def iter_text_files(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Local text files, one document each (the offline path for real text)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        yield path.read_text(encoding="utf-8", errors="replace")


def iter_generated_texts(seed: int, words_per_document: int = 2000) -> Iterator[str]:
    """Endless generated prose (the offline default when no text is available)."""
    index = 0
    while True:
        yield generate_haystack_text(words_per_document, seed=seed * 1_000_003 + index)
        index += 1


# --- token blocks ---------------------------------------------------------------------------------------------
def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def build_token_blocks(
    texts: Iterable[str], tokenizer: Any, seq_len: int, num_blocks: int, cache_dir: str | os.PathLike,
    source: str,
) -> np.ndarray:
    """(num_blocks, seq_len) int32 blocks of consecutive tokens (documents separated by EOS), cached on disk.

    The cache file name hashes (source, tokenizer, seq_len, num_blocks); it is written to a temporary file and
    renamed, so an interrupted build is never read. A second call loads it without tokenising.
    """
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    path = Path(cache_dir) / f"blocks-{_fingerprint(source, name, len(tokenizer), seq_len, num_blocks)}.npy"
    if path.exists():
        return np.load(path)
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    blocks = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len and len(blocks) < num_blocks:
            blocks.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if len(blocks) >= num_blocks:
            break
    if len(blocks) < num_blocks:
        raise ValueError(f"source {source!r} gave only {len(blocks)} blocks of {seq_len} tokens, {num_blocks} needed")
    array = np.asarray(blocks, dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return array


def _unit(seed: int, index: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, index, salt), independent of any global RNG state."""
    digest = hashlib.sha256(f"{seed}:{index}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class LMBlockDataset(Dataset):
    """Language-modelling blocks; a fraction ``niah_ratio`` of them carries an injected needle.

    An injected sample is a NIAH prompt built from that block's own tokens as haystack, followed by the answer,
    so it keeps ``seq_len`` tokens; which samples, which template, depth and needle all follow from (seed, index).
    """

    def __init__(self, blocks: np.ndarray, tokenizer: Any, niah_ratio: float = 0.01, seed: int = 0,
                 templates: Sequence[str] = ("passkey",)):
        if not 0.0 <= niah_ratio <= 1.0:
            raise ValueError(f"niah_ratio must be in [0, 1], got {niah_ratio}")
        self.blocks, self.tokenizer, self.niah_ratio, self.seed = blocks, tokenizer, niah_ratio, seed
        self.templates = tuple(templates)

    def __len__(self) -> int:
        return len(self.blocks)

    def is_injected(self, index: int) -> bool:
        return _unit(self.seed, index, "inject") < self.niah_ratio

    def injection_indices(self) -> list[int]:
        return [i for i in range(len(self)) if self.is_injected(i)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = [int(t) for t in self.blocks[index]]
        if self.is_injected(index):
            rng = random.Random(f"{self.seed}:{index}:needle")
            needle = make_needle(self.templates[rng.randrange(len(self.templates))], rng)
            answer = self.tokenizer(needle.answer, add_special_tokens=False)["input_ids"]
            prompt, answer = build_niah_prompt(self.tokenizer, ids, len(ids) - len(answer), rng.random(), needle)
            ids = prompt + answer
        tensor = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": tensor, "labels": tensor.clone()}


class PasskeyRetrievalDataset(Dataset):
    """The synthetic long-context retrieval task: a needle in a haystack, by default beyond the local window.

    Sample = haystack with the needle (for a share ``beyond_window`` of samples) at least ``window + chunk`` tokens
    before the question, then the answer.
    With ``loss_on="answer"`` only the answer tokens are labelled, so the loss is the retrieval loss.
    """

    def __init__(self, tokenizer: Any, seq_len: int, num_samples: int, seed: int, window: int, chunk_size: int = 0,
                 template: str = "niah_words", loss_on: str = "answer", beyond_window: float = 1.0):
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} is unknown; valid templates are {list(TEMPLATES)}")
        if loss_on not in ("answer", "all"):
            raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
        self.tokenizer, self.seq_len, self.num_samples, self.seed = tokenizer, seq_len, num_samples, seed
        self.window, self.chunk_size, self.template, self.loss_on = window, chunk_size, template, loss_on
        self.beyond_window = beyond_window
        self.haystack = tokenizer(generate_haystack_text(seq_len * 8, seed), add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[list[int], list[int], dict[str, Any]]:
        """(prompt ids, answer ids, {"needle_start", "needle_end", "depth"}) of sample ``index``."""
        rng = random.Random(f"{self.seed}:{index}:passkey")
        needle = make_needle(self.template, rng)
        answer = self.tokenizer(needle.answer, add_special_tokens=False)["input_ids"]
        needle_len = len(self.tokenizer(" " + " ".join(needle.needle_texts), add_special_tokens=False)["input_ids"])
        question_len = len(self.tokenizer(" " + needle.question, add_special_tokens=False)["input_ids"])
        length = self.seq_len - len(answer)
        hay_len = length - needle_len - question_len
        # A share ``beyond_window`` of the needles ends at least window + chunk tokens before the question (only the
        # memory can reach them); the others lie anywhere, so local retrieval is learnt too.
        latest = hay_len - (self.window + self.chunk_size)
        if latest < 0:
            raise ValueError(
                f"seq_len {self.seq_len} is too short to put the needle beyond the window ({self.window} + "
                f"{self.chunk_size} tokens); use seq_len >= {self.seq_len - latest}"
            )
        start = rng.randrange(latest + 1) if rng.random() < self.beyond_window else rng.randrange(hay_len + 1)
        offset = rng.randrange(len(self.haystack))
        haystack = self.haystack[offset:] + self.haystack[:offset]
        prompt, answer = build_niah_prompt(self.tokenizer, haystack, length, start / hay_len if hay_len else 0.0, needle)
        return prompt, answer, {"needle_start": start, "needle_end": start + needle_len, "question_start": length - question_len}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        prompt, answer, _ = self.sample(index)
        ids = torch.tensor(prompt + answer, dtype=torch.long)
        labels = ids.clone()
        if self.loss_on == "answer":
            labels[: len(prompt)] = -100
        return {"input_ids": ids, "labels": labels}


# --- from the workspace configuration --------------------------------------------------------------------------
def build_tokenizer(cfg: Any) -> Any:
    """The tokenizer a configuration trains with (synthetic, the offline SmolLM2's, or a Hub tokenizer)."""
    if cfg.model.tokenizer == "synthetic":
        return build_synthetic_tokenizer()
    if cfg.model.base_model == "local-smollm2":
        from .conversion import load_local_smollm2

        return load_local_smollm2()[1]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.base_model)


def build_dataset(cfg: Any, tokenizer: Any) -> Dataset:
    """The training dataset named by ``experiment.dataset``."""
    e, t = cfg.experiment, cfg.training
    if e.dataset == "passkey":
        return PasskeyRetrievalDataset(tokenizer, t.seq_len, e.num_train_samples, t.seed, cfg.model.sliding_window,
                                       cfg.model.chunk_size, template=e.niah_templates[0],
                                       beyond_window=e.needle_beyond_window)
    if e.dataset == "pg19":
        texts, source = iter_pg19_texts(e.dataset_name), f"hub:{e.dataset_name}"
    elif e.dataset == "text_files":
        texts, source = iter_text_files(e.data_files), "files:" + ",".join(map(str, e.data_files))
    elif e.dataset == "generated":
        texts, source = iter_generated_texts(t.seed), f"generated:{t.seed}"
    else:
        raise ValueError(f"experiment.dataset = {e.dataset!r} is unknown; valid values are {list(DATASETS)}")
    blocks = build_token_blocks(texts, tokenizer, t.seq_len, e.num_train_samples, e.data_cache_dir, source)
    return LMBlockDataset(blocks, tokenizer, e.niah_ratio, t.seed, e.niah_templates)


__all__ = [
    "iter_pg19_texts", "iter_text_files", "iter_generated_texts", "build_token_blocks", "LMBlockDataset",
    "PasskeyRetrievalDataset", "build_tokenizer", "build_dataset",
]
