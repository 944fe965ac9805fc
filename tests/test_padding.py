"""Left-padded batches: padding enters neither window nor memory, each row keeps its own positions, and a padded
batch gives, row by row, what each row gives alone (forward, streaming, greedy and beam generate, pipeline)."""

from __future__ import annotations

import pytest
import torch

from senri import SenriCache
from tests.conftest import tiny_model

LENGTHS = (45, 30, 7, 1)  # windows of 16 in chunks of 4: the long rows write memory, the short ones do not yet


def _left_padded(sequences: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    return ids, mask


def _sequences(seed: int, lengths=LENGTHS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize(
    "layer_types",
    [["sliding_attention", "memory", "sliding_attention"], ["memory_only", "memory", "full_attention"]],
)
def test_a_padded_batch_streams_row_by_row_like_each_row_alone(layer_types, sinks):
    model = tiny_model(layer_types=layer_types, num_sink_tokens=sinks, memory_gate_init=0.5)
    sequences = _sequences(0)
    ids, mask = _left_padded(sequences)
    width = ids.shape[1]
    more = torch.randint(1, 97, (len(sequences), 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        cache = first.cache
        assert cache.pad_offsets == tuple(width - n for n in LENGTHS)
        # Continue in pieces, with a mask over the new tokens or over the whole stream (as generate passes it).
        second = model(input_ids=more[:, :13], cache=cache, attention_mask=torch.ones(4, 13, dtype=torch.long))
        full_mask = torch.cat([mask, torch.ones(4, 40, dtype=torch.long)], dim=1)
        third = model(input_ids=more[:, 13:], cache=cache, attention_mask=full_mask, position_ids=(
            torch.arange(width + 13, width + 40)[None] - torch.tensor(cache.pad_offsets)[:, None]))
        for b, s in enumerate(sequences):
            n = len(s)
            alone = model(input_ids=torch.cat([s, more[b]])[None], output_attentions=True)
            torch.testing.assert_close(first.logits[b, width - n:], alone.logits[0, :n], rtol=0, atol=1e-5)
            torch.testing.assert_close(second.logits[b], alone.logits[0, n : n + 13], rtol=0, atol=1e-5)
            torch.testing.assert_close(third.logits[b], alone.logits[0, n + 13:], rtol=0, atol=1e-5)
            # Attention weights over the stream: the row's own weights, none on padding.
            for padded, own in zip(first.attentions, alone.attentions):
                torch.testing.assert_close(padded[b, :, width - n:, width - n:], own[0, :, :n, :n], rtol=0, atol=1e-5)
                assert not padded[b, :, :, : width - n].any() and not padded[b, :, : width - n].any()
    # The padded batch's memories are each row's own; padding was never written.
    with torch.no_grad():
        for b, s in enumerate(sequences):
            row_cache = SenriCache(model.config, 1)
            model(input_ids=torch.cat([s, more[b]])[None], cache=row_cache)
            for idx, layer in enumerate(cache.layers):
                row = layer.state.row(b)
                assert row.seen_tokens == row_cache.layers[idx].state.seen_tokens == len(s) + 40
                assert row.written_chunks == row_cache.layers[idx].state.written_chunks
                if row.M is not None:
                    torch.testing.assert_close(row.M, row_cache.layers[idx].state.M, rtol=0, atol=1e-5)


def test_padded_greedy_and_beam_generate_give_each_row_what_it_gives_alone():
    model = tiny_model(num_sink_tokens=2, memory_gate_init=0.5)
    model.generation_config.eos_token_id = None
    sequences = _sequences(2, (37, 20, 6))
    ids, mask = _left_padded(sequences)
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0, **kwargs)
        for b, s in enumerate(sequences):
            alone = model.generate(s[None], max_new_tokens=30, pad_token_id=0, **kwargs)
            assert torch.equal(batched[b, ids.shape[1]:], alone[0, len(s):]), (kwargs, b)


def test_text_generation_pipeline_with_batches_gives_what_each_prompt_gives_alone():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 97)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer, words.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]",
                                        padding_side="left")
    model = tiny_model(num_sink_tokens=2, memory_gate_init=0.5)
    model.generation_config.eos_token_id = None
    prompts = [" ".join(f"w{int(i) + 1}" for i in s) for s in _sequences(3, (45, 23, 8, 30))]
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    settings = dict(max_new_tokens=25, do_sample=False, return_full_text=False)
    batched = generator(prompts, batch_size=4, **settings)
    alone = [generator(prompt, **settings) for prompt in prompts]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]
    assert all(len(a[0]["generated_text"].split()) == 25 for a in alone)


def test_padding_rules_are_enforced_and_a_padded_state_is_not_saved():
    model = tiny_model()
    ids, mask = _left_padded(_sequences(4, (10, 6)))
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask).cache
        with pytest.raises(ValueError, match=r"rows \[1\] are not"):  # new padding after real tokens
            model(input_ids=ids[:, :2], cache=cache, attention_mask=torch.tensor([[1, 1], [0, 1]]))
        with pytest.raises(ValueError, match=r"rows \[1\] are not"):  # disagrees with the padding row 1 has
            model(input_ids=ids[:, :1], cache=cache, attention_mask=torch.ones(2, 11, dtype=torch.long))
        with pytest.raises(ValueError, match="position_ids must continue the cache"):  # stream, not row, positions
            model(input_ids=ids[:, :1], cache=cache, position_ids=torch.tensor([[10], [10]]))
        assert cache.seen_tokens == 10  # refused calls change nothing
    with pytest.raises(ValueError, match="left-padded batch cannot be saved"):
        cache.get_memory_state()
