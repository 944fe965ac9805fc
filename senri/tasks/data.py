"""Training data: long documents cut into fixed-length token blocks (cached on disk), NIAH injection, and the
synthetic long-context retrieval task of the CPU memory proof.

Every sample is a function of (seed, sample index) alone, never of global RNG state: a resumed run or another
worker sees identical samples.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..model.io import atomic_write
from .niah import TEMPLATES, build_niah_prompt, build_synthetic_tokenizer, generate_haystack_text, make_needle

DATASETS = ("pg19", "text_files", "generated", "passkey")
TOKENIZERS = ("base", "synthetic")
LOSS_ON = ("answer", "all")


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()


def _unit(seed: int, index: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, index, salt), independent of any global RNG state."""
    return int.from_bytes(_digest(seed, index, salt)[:8], "big") / 2**64


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: a whole book is longer than model_max_length, which is expected here, not worth a warning.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


# --- text sources ---------------------------------------------------------------------------------------------
def iter_pg19_texts(dataset_name: str = "emozilla/pg19", split: str = "train", streaming: bool = True) -> Iterator[str]:
    """Books from PG19 on the Hub (the Colab path; ``emozilla/pg19`` is parquet with a ``text`` column).

    Streaming reads only as many books as the blocks need instead of downloading ~11 GB.
    """
    from datasets import load_dataset

    for row in load_dataset(dataset_name, split=split, streaming=streaming):
        if row["text"]:
            yield row["text"]


def iter_text_files(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Local text files, one document each (the offline path for real text)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        yield path.read_text(encoding="utf-8", errors="replace")


def describe_text_files(paths: Sequence[str | os.PathLike]) -> str:
    """A cache key for local files that changes when a file is edited (path, size and mtime of each)."""
    stats = [(str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) if Path(p).is_file() else (str(p),)
             for p in paths]
    return f"files:{stats}"


def iter_generated_texts(seed: int, words_per_document: int = 2000) -> Iterator[str]:
    """Endless generated prose (the offline default when no text is available).

    Document seeds are hashed from (seed, index), so they never coincide with the small integer seeds that
    evaluation uses for its held-out text.
    """
    index = 0
    while True:
        document_seed = int.from_bytes(_digest("generated", seed, index)[:8], "big")
        yield generate_haystack_text(words_per_document, seed=document_seed)
        index += 1


# --- token blocks ---------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer by what it does (vocabulary and EOS), not by where it was loaded from."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr((len(tokenizer), tokenizer.eos_token_id, vocab)).encode()).hexdigest()[:16]


def token_blocks_path(cache_dir: str | os.PathLike, source: str, tokenizer: Any, seq_len: int, num_blocks: int) -> Path:
    """Where :func:`build_token_blocks` caches the blocks of (source, tokenizer, seq_len, num_blocks)."""
    key = _digest(source, tokenizer_fingerprint(tokenizer), seq_len, num_blocks).hex()[:16]
    return Path(cache_dir) / f"blocks-{key}.npy"


def build_token_blocks(
    texts: Iterable[str], tokenizer: Any, seq_len: int, num_blocks: int, cache_dir: str | os.PathLike, source: str,
) -> np.ndarray:
    """(num_blocks, seq_len) int32 blocks of consecutive tokens, documents separated by EOS, cached on disk.

    ``source`` describes ``texts`` for the cache key (e.g. ``"hub:emozilla/pg19"``). The file is written under a
    temporary name and renamed, so an interrupted build is never read; a second call loads it without tokenising.
    """
    path = token_blocks_path(cache_dir, source, tokenizer, seq_len, num_blocks)
    if path.exists():
        return np.load(path)
    eos = tokenizer.eos_token_id
    blocks = np.empty((num_blocks, seq_len), dtype=np.int32)  # preallocated: 4 bytes a token, not a Python int
    filled, pending = 0, np.empty(0, dtype=np.int32)  # pending: tokens not yet in a full block
    for text in texts:
        ids = _encode(tokenizer, text) + ([eos] if eos is not None else [])
        pending = np.concatenate([pending, np.asarray(ids, dtype=np.int32)])
        usable = min(len(pending) // seq_len, num_blocks - filled)
        blocks[filled : filled + usable] = pending[: usable * seq_len].reshape(usable, seq_len)
        filled, pending = filled + usable, pending[usable * seq_len :]
        if filled == num_blocks:
            break
    if filled < num_blocks:
        raise ValueError(f"source {source!r} gave only {filled} blocks of {seq_len} tokens, {num_blocks} needed")
    with atomic_write(path, "wb") as f:
        np.save(f, blocks)
    return blocks


class LMBlockDataset(Dataset):
    """Language-modelling blocks; a fraction ``niah_ratio`` of them carries an injected needle.

    An injected sample is a NIAH prompt built from that block's own tokens as haystack, followed by the answer,
    so it keeps ``seq_len`` tokens; which samples, which template, depth and needle all follow from (seed, index).
    """

    def __init__(self, blocks: np.ndarray, tokenizer: Any, niah_ratio: float = 0.01, seed: int = 0,
                 templates: Sequence[str] = ("passkey",)):
        if not 0.0 <= niah_ratio <= 1.0:
            raise ValueError(f"niah_ratio must be in [0, 1], got {niah_ratio}")
        unknown = [t for t in templates if t not in TEMPLATES]
        if unknown or not templates:
            # Checked here: an unknown template would otherwise fail only at the first injected sample, mid-run.
            raise ValueError(
                f"NIAH templates {unknown or list(templates)} are not valid; valid templates are {list(TEMPLATES)}"
            )
        if blocks.ndim != 2:
            raise ValueError(f"blocks must be (num_blocks, seq_len), got shape {blocks.shape}")
        self.blocks, self.tokenizer, self.niah_ratio, self.seed = blocks, tokenizer, niah_ratio, seed
        self.templates = tuple(templates)

    def __len__(self) -> int:
        return len(self.blocks)

    def is_injected(self, index: int) -> bool:
        return _unit(self.seed, index, "inject") < self.niah_ratio

    def injection_indices(self) -> list[int]:
        return [i for i in range(len(self)) if self.is_injected(i)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index].tolist()
        if self.is_injected(index):
            rng = random.Random(f"{self.seed}:{index}:needle")  # string seeds hash the same in every process
            needle = make_needle(self.templates[rng.randrange(len(self.templates))], rng)
            answer = _encode(self.tokenizer, needle.answer)
            prompt, answer = build_niah_prompt(self.tokenizer, ids, len(ids) - len(answer), rng.random(), needle)
            ids = prompt + answer
        input_ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": input_ids, "labels": input_ids.clone()}


class PasskeyRetrievalDataset(Dataset):
    """The synthetic long-context retrieval task: a needle in a haystack, by default beyond the local window.

    A sample is ``seq_len`` tokens: haystack with the needle, the question, the answer. For a share
    ``beyond_window`` of samples the needle ends at least ``min_distance`` tokens (default ``window + chunk_size``,
    the most a block-sliding window can see) before the question, so only the memory can reach it; the others
    put it anywhere, so local retrieval is learnt too. With ``loss_on="answer"`` only the answer tokens are
    labelled, so the loss is the retrieval loss.
    """

    def __init__(self, tokenizer: Any, seq_len: int, num_samples: int, seed: int, window: int, chunk_size: int = 0,
                 template: str = "niah_words", loss_on: str = "answer", beyond_window: float = 1.0,
                 min_distance: int | None = None):
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} is unknown; valid templates are {list(TEMPLATES)}")
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on = {loss_on!r} is not valid; valid values are {list(LOSS_ON)}")
        self.tokenizer, self.seq_len, self.num_samples, self.seed = tokenizer, seq_len, num_samples, seed
        self.template, self.loss_on, self.beyond_window = template, loss_on, beyond_window
        self.min_distance = window + chunk_size if min_distance is None else min_distance
        self.haystack = _encode(tokenizer, generate_haystack_text(seq_len * 8, seed))

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[list[int], list[int], dict[str, Any]]:
        """(prompt ids, answer ids, {"needle_start", "needle_end", "question_start"}) of sample ``index``."""
        rng = random.Random(f"{self.seed}:{index}:passkey")
        needle = make_needle(self.template, rng)
        answer = _encode(self.tokenizer, needle.answer)
        # The same encodings build_niah_prompt makes, to know where the needle lands.
        needle_len = len(_encode(self.tokenizer, " " + " ".join(needle.needle_texts)))
        question_len = len(_encode(self.tokenizer, " " + needle.question))
        length = self.seq_len - len(answer)
        hay_len = length - needle_len - question_len
        latest = hay_len - self.min_distance  # the last needle start still min_distance before the question
        if latest < 0:
            raise ValueError(
                f"seq_len {self.seq_len} is too short to put the needle beyond the window ({self.min_distance} "
                f"tokens before the question); use seq_len >= {self.seq_len - latest}"
            )
        start = rng.randrange(latest + 1) if rng.random() < self.beyond_window else rng.randrange(hay_len + 1)
        offset = rng.randrange(len(self.haystack))  # a different stretch of haystack per sample
        haystack = self.haystack[offset:] + self.haystack[:offset]
        depth = start / hay_len if hay_len else 0.0
        prompt, answer = build_niah_prompt(self.tokenizer, haystack, length, depth, needle)
        where = {"needle_start": start, "needle_end": start + needle_len, "question_start": length - question_len}
        return prompt, answer, where

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        prompt, answer, _ = self.sample(index)
        input_ids = torch.tensor(prompt + answer, dtype=torch.long)
        labels = input_ids.clone()
        if self.loss_on == "answer":
            labels[: len(prompt)] = -100  # ignored by the loss: only retrieving the answer is learnt
        return {"input_ids": input_ids, "labels": labels}


# --- from the workspace configuration --------------------------------------------------------------------------
def build_tokenizer(cfg: Any) -> Any:
    """The tokenizer a configuration trains with (synthetic, the offline SmolLM2's, or a Hub tokenizer)."""
    if cfg.model.tokenizer == "synthetic":
        return build_synthetic_tokenizer()
    if cfg.model.tokenizer != "base":
        raise ValueError(f"model.tokenizer = {cfg.model.tokenizer!r} is unknown; valid values are {list(TOKENIZERS)}")
    if cfg.model.base_model == "local-smollm2":
        from ..model.conversion import load_local_smollm2

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
        texts, source = iter_text_files(e.data_files), describe_text_files(e.data_files)
    elif e.dataset == "generated":
        texts, source = iter_generated_texts(t.seed), f"generated:{t.seed}"
    else:
        raise ValueError(f"experiment.dataset = {e.dataset!r} is unknown; valid values are {list(DATASETS)}")
    blocks = build_token_blocks(texts, tokenizer, t.seq_len, e.num_train_samples, e.data_cache_dir, source)
    return LMBlockDataset(blocks, tokenizer, e.niah_ratio, t.seed, e.niah_templates)


__all__ = [
    "DATASETS", "iter_pg19_texts", "iter_text_files", "describe_text_files", "iter_generated_texts",
    "tokenizer_fingerprint", "token_blocks_path", "build_token_blocks", "LMBlockDataset", "PasskeyRetrievalDataset",
    "build_tokenizer", "build_dataset",
]
