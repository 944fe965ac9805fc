"""Data: cached token blocks, deterministic NIAH injection, and the retrieval task's needle beyond the window."""

from __future__ import annotations

import numpy as np
import pytest

from senri.config import ConfigManager
from senri.data import (
    LMBlockDataset, PasskeyRetrievalDataset, build_dataset, build_token_blocks, build_tokenizer,
    iter_generated_texts, iter_text_files,
)
from senri.niah import build_synthetic_tokenizer

TOKENIZER = build_synthetic_tokenizer()


def test_blocks_have_exact_length_separate_documents_and_are_cached(tmp_path):
    docs = ["the river was old .", "a small child found the candle ."] * 40
    blocks = build_token_blocks(iter(docs), TOKENIZER, 16, 10, tmp_path, "test")
    assert blocks.shape == (10, 16) and blocks.dtype == np.int32
    assert TOKENIZER.eos_token_id in blocks[0]

    def exploding():
        raise AssertionError("re-tokenised although the blocks are cached")
        yield ""

    again = build_token_blocks(exploding(), TOKENIZER, 16, 10, tmp_path, "test")
    assert np.array_equal(blocks, again)
    # An interrupted build leaves only a dot-temp file, which is never loaded.
    (tmp_path / ".blocks-interrupted.npy").write_bytes(b"garbage")
    assert np.array_equal(build_token_blocks(exploding(), TOKENIZER, 16, 10, tmp_path, "test"), blocks)
    with pytest.raises(ValueError, match="gave only"):
        build_token_blocks(iter(docs[:2]), TOKENIZER, 16, 10, tmp_path, "short")


def test_text_files_source_names_missing_files(tmp_path):
    (tmp_path / "a.txt").write_text("the river")
    assert list(iter_text_files([tmp_path / "a.txt"])) == ["the river"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_text_files([tmp_path / "missing.txt"]))


def _dataset(ratio: float, seed: int = 0, n: int = 400, tmp=None) -> LMBlockDataset:
    texts = iter_generated_texts(seed=0, words_per_document=300)
    blocks = build_token_blocks(texts, TOKENIZER, 128, n, tmp, "generated:0")
    return LMBlockDataset(blocks, TOKENIZER, niah_ratio=ratio, seed=seed, templates=("passkey", "niah_words"))


def test_injection_ratio_and_determinism_across_instances(tmp_path):
    dataset = _dataset(0.2, tmp=tmp_path)
    share = len(dataset.injection_indices()) / len(dataset)
    assert 0.14 < share < 0.26
    other = _dataset(0.2, tmp=tmp_path)
    assert other.injection_indices() == dataset.injection_indices()
    for i in dataset.injection_indices()[:5]:
        assert dataset[i]["input_ids"].tolist() == other[i]["input_ids"].tolist()
    assert _dataset(0.2, seed=1, tmp=tmp_path).injection_indices() != dataset.injection_indices()
    low = LMBlockDataset(np.zeros((2000, 4), dtype=np.int32), TOKENIZER, niah_ratio=0.01, seed=0)
    assert 8 <= len(low.injection_indices()) <= 35


def test_injected_sample_holds_the_needle_and_ends_with_the_answer(tmp_path):
    dataset = _dataset(0.2, tmp=tmp_path)
    index = dataset.injection_indices()[0]
    text = TOKENIZER.decode(dataset[index]["input_ids"])
    assert len(dataset[index]["input_ids"]) == 128
    assert ("pass key is" in text) or ("special magic word is" in text)
    last_question = text.rsplit(" is ", 1)[1]
    assert last_question.replace(" ", "") and last_question.replace(" ", "") in text.split("?")[0].replace(" ", "")


def test_retrieval_task_puts_the_needle_beyond_the_window_and_labels_only_the_answer():
    dataset = PasskeyRetrievalDataset(TOKENIZER, seq_len=256, num_samples=50, seed=3, window=64, chunk_size=16)
    for i in range(20):
        prompt, answer, where = dataset.sample(i)
        assert len(prompt) + len(answer) == 256
        assert where["question_start"] - where["needle_end"] >= 64 + 16
        item = dataset[i]
        assert (item["labels"] != -100).sum() == len(answer)
        assert item["labels"][-len(answer):].tolist() == answer
    assert dataset[7]["input_ids"].tolist() == PasskeyRetrievalDataset(
        TOKENIZER, seq_len=256, num_samples=50, seed=3, window=64, chunk_size=16)[7]["input_ids"].tolist()
    with pytest.raises(ValueError, match="too short to put the needle beyond the window"):
        PasskeyRetrievalDataset(TOKENIZER, seq_len=64, num_samples=1, seed=0, window=64, chunk_size=16)[0]


def test_build_from_profiles(tmp_path):
    cfg = ConfigManager("cpu-smoke", overrides={"data_cache_dir": str(tmp_path), "num_train_samples": 8})
    tokenizer = build_tokenizer(cfg)
    dataset = build_dataset(cfg, tokenizer)
    assert len(dataset) == 8 and dataset[0]["input_ids"].shape == (128,)
    proof = build_dataset(ConfigManager("cpu-proof"), tokenizer)
    assert isinstance(proof, PasskeyRetrievalDataset) and proof[0]["input_ids"].shape == (256,)
