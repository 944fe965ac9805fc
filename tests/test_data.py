"""Data: cached token blocks, deterministic NIAH injection, and the retrieval task's needle beyond the window."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import senri.tasks.data as data
from senri.training.config import ConfigManager
from senri.tasks.data import (
    LMBlockDataset, PasskeyRetrievalDataset, build_dataset, build_token_blocks, build_tokenizer, describe_text_files,
    iter_generated_texts, iter_text_files, token_blocks_path,
)
from senri.tasks.niah import build_synthetic_tokenizer

TOKENIZER = build_synthetic_tokenizer()
DOCS = ["the river was old .", "a small child found the candle near the bridge ."] * 20


def encode(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


class NoTokenising:
    """The synthetic tokenizer, except that tokenising fails: proves a cached build never tokenises."""

    eos_token_id = TOKENIZER.eos_token_id

    def __len__(self) -> int:
        return len(TOKENIZER)

    def get_vocab(self) -> dict[str, int]:
        return TOKENIZER.get_vocab()

    def __call__(self, *args, **kwargs):
        raise AssertionError("re-tokenised although the blocks are cached")


def exploding_texts():
    raise AssertionError("texts read although the blocks are cached")
    yield ""


def scramble_global_rng(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def test_blocks_are_consecutive_documents_separated_by_eos(tmp_path):
    blocks = build_token_blocks(iter(DOCS), TOKENIZER, 16, 10, tmp_path, "test")
    assert blocks.shape == (10, 16) and blocks.dtype == np.int32
    stream = [t for doc in DOCS for t in encode(doc) + [TOKENIZER.eos_token_id]]
    assert blocks.reshape(-1).tolist() == stream[: 10 * 16]
    with pytest.raises(ValueError, match="gave only 1 blocks of 16 tokens, 10 needed"):
        build_token_blocks(iter(DOCS[:2]), TOKENIZER, 16, 10, tmp_path, "short")


def test_second_build_loads_the_cache_without_tokenising(tmp_path):
    blocks = build_token_blocks(iter(DOCS), TOKENIZER, 16, 10, tmp_path, "test")
    assert np.array_equal(build_token_blocks(exploding_texts(), NoTokenising(), 16, 10, tmp_path, "test"), blocks)
    # Another source, length or count is another cache entry.
    assert len({token_blocks_path(tmp_path, s, TOKENIZER, L, n) for s, L, n in
                [("test", 16, 10), ("other", 16, 10), ("test", 32, 10), ("test", 16, 5)]}) == 4


def test_an_interrupted_build_is_never_read(tmp_path, monkeypatch):
    path = token_blocks_path(tmp_path, "test", TOKENIZER, 16, 10)
    # A build killed outright (SIGKILL) leaves a half-written temporary file beside the cache entry.
    (tmp_path / f".{path.stem}.killed.tmp").write_bytes(b"\x93NUMPY half")

    def crash(file, array):  # a crash in the middle of writing
        file.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(data.np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        build_token_blocks(iter(DOCS), TOKENIZER, 16, 10, tmp_path, "test")
    assert not path.exists() and len(list(tmp_path.iterdir())) == 1  # our own temporary file is cleaned up
    monkeypatch.undo()
    blocks = build_token_blocks(iter(DOCS), TOKENIZER, 16, 10, tmp_path, "test")
    assert blocks.shape == (10, 16)
    assert np.array_equal(build_token_blocks(exploding_texts(), NoTokenising(), 16, 10, tmp_path, "test"), blocks)


def test_text_files_name_missing_files_and_key_the_cache_by_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("the river")
    assert list(iter_text_files([path])) == ["the river"]
    before = describe_text_files([path])
    path.write_text("the river was old")
    assert describe_text_files([path]) != before
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_text_files([tmp_path / "missing.txt"]))


def generated_blocks(tmp_path, n: int = 200) -> np.ndarray:
    return build_token_blocks(iter_generated_texts(seed=0, words_per_document=300), TOKENIZER, 128, n, tmp_path,
                              "generated:0")


def test_injection_share_follows_niah_ratio():
    blocks = np.zeros((2000, 4), dtype=np.int32)  # __getitem__ is not called: only the choice is measured
    assert 0.17 < len(LMBlockDataset(blocks, TOKENIZER, niah_ratio=0.2).injection_indices()) / 2000 < 0.23
    assert 8 <= len(LMBlockDataset(blocks, TOKENIZER, niah_ratio=0.01).injection_indices()) <= 35
    assert LMBlockDataset(blocks, TOKENIZER, niah_ratio=0.0).injection_indices() == []
    with pytest.raises(ValueError, match="valid templates are"):
        LMBlockDataset(blocks, TOKENIZER, templates=("passkee",))


def test_injections_depend_only_on_seed_and_index(tmp_path):
    blocks = generated_blocks(tmp_path)
    templates = ("passkey", "niah_words")
    scramble_global_rng(1)
    first = LMBlockDataset(blocks, TOKENIZER, niah_ratio=0.2, seed=5, templates=templates)
    indices = first.injection_indices()
    samples = [first[i]["input_ids"] for i in reversed(indices)]  # order of access must not matter either
    scramble_global_rng(2)
    second = LMBlockDataset(blocks, TOKENIZER, niah_ratio=0.2, seed=5, templates=templates)
    assert second.injection_indices() == indices
    assert all(torch.equal(s, second[i]["input_ids"]) for s, i in zip(samples, reversed(indices)))
    assert LMBlockDataset(blocks, TOKENIZER, niah_ratio=0.2, seed=6).injection_indices() != indices
    plain = next(i for i in range(len(blocks)) if i not in indices)
    assert first[plain]["input_ids"].tolist() == blocks[plain].tolist()


def test_injected_sample_is_the_block_with_needle_question_and_answer(tmp_path):
    blocks = generated_blocks(tmp_path, n=8)
    dataset = LMBlockDataset(blocks, TOKENIZER, niah_ratio=1.0, seed=0, templates=("niah_words",))
    question = encode(" What is the hidden word? The hidden word is")
    for i in range(len(dataset)):
        item, block = dataset[i], blocks[i].tolist()
        ids = item["input_ids"].tolist()
        assert len(ids) == 128 and torch.equal(item["labels"], item["input_ids"])
        word = TOKENIZER.decode(ids[-1:]).strip()
        needle, answer = encode(f" The hidden word is {word}."), encode(f" {word}")
        hay_len = 128 - len(needle) - len(question) - len(answer)
        # The haystack is this block's own tokens; the needle sits somewhere in it and the answer ends the sample.
        assert any(ids == block[:at] + needle + block[at:hay_len] + question + answer for at in range(hay_len + 1))


def test_retrieval_task_puts_the_needle_beyond_the_window_and_labels_only_the_answer():
    dataset = PasskeyRetrievalDataset(TOKENIZER, seq_len=256, num_samples=50, seed=3, window=64, chunk_size=16)
    for i in range(20):
        prompt, answer, where = dataset.sample(i)
        assert len(prompt) + len(answer) == 256
        assert where["question_start"] - where["needle_end"] >= 64 + 16
        needle_text = TOKENIZER.decode(prompt[where["needle_start"]: where["needle_end"]])
        assert needle_text.startswith("the hidden word is") and TOKENIZER.decode(answer) in needle_text
        item = dataset[i]
        assert (item["labels"] != -100).sum() == len(answer)
        assert item["labels"][-len(answer):].tolist() == answer == item["input_ids"][-len(answer):].tolist()
    scramble_global_rng(4)
    again = PasskeyRetrievalDataset(TOKENIZER, seq_len=256, num_samples=50, seed=3, window=64, chunk_size=16)
    assert torch.equal(again[7]["input_ids"], dataset[7]["input_ids"])
    everything = PasskeyRetrievalDataset(TOKENIZER, 256, 50, seed=3, window=64, chunk_size=16, loss_on="all")[7]
    assert torch.equal(everything["labels"], dataset[7]["input_ids"])
    with pytest.raises(ValueError, match="too short to put the needle beyond the window"):
        PasskeyRetrievalDataset(TOKENIZER, seq_len=64, num_samples=1, seed=0, window=64, chunk_size=16)[0]
    with pytest.raises(ValueError, match="valid values are \\['answer', 'all'\\]"):
        PasskeyRetrievalDataset(TOKENIZER, 256, 1, seed=0, window=64, loss_on="prompt")


def test_retrieval_task_mixes_needles_inside_and_beyond_the_window():
    dataset = PasskeyRetrievalDataset(TOKENIZER, seq_len=256, num_samples=200, seed=0, window=32, beyond_window=0.5,
                                      min_distance=100)
    distances = [w["question_start"] - w["needle_end"] for w in (dataset.sample(i)[2] for i in range(200))]
    beyond = sum(d >= 100 for d in distances)
    assert 0.5 * 200 <= beyond < 200 and min(distances) < 32  # half forced beyond, the rest anywhere


def test_build_from_profiles(tmp_path):
    cfg = ConfigManager("cpu-smoke", overrides={"data_cache_dir": str(tmp_path), "num_train_samples": 8})
    tokenizer = build_tokenizer(cfg)
    dataset = build_dataset(cfg, tokenizer)
    assert isinstance(dataset, LMBlockDataset) and len(dataset) == 8 and dataset[0]["input_ids"].shape == (128,)
    proof = build_dataset(ConfigManager("cpu-proof"), tokenizer)
    assert isinstance(proof, PasskeyRetrievalDataset) and proof[0]["input_ids"].shape == (256,)


def test_unknown_dataset_or_tokenizer_names_the_valid_ones():
    cfg = SimpleNamespace(model=SimpleNamespace(tokenizer="bpe", base_model="x"),
                          experiment=SimpleNamespace(dataset="wikitext"), training=SimpleNamespace(seed=0))
    with pytest.raises(ValueError, match="'bpe' is unknown; valid values are \\['base', 'synthetic'\\]"):
        build_tokenizer(cfg)
    with pytest.raises(ValueError, match="'wikitext' is unknown; valid values are \\['pg19', 'text_files'"):
        build_dataset(cfg, TOKENIZER)
