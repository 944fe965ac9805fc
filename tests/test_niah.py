"""NIAH prompts: exact length, needle at the requested depth, deterministic, covered by the synthetic tokenizer."""

from __future__ import annotations

import random

import pytest

from senri.tasks.niah import TEMPLATES, build_niah_prompt, build_synthetic_tokenizer, generate_haystack_text, make_needle

TOKENIZER = build_synthetic_tokenizer()
HAYSTACK = TOKENIZER(generate_haystack_text(400, seed=0), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t != "niah_uuids"])
def test_every_template_is_covered_by_the_synthetic_tokenizer(template):
    needle = make_needle(template, random.Random(0))
    prompt, answer = build_niah_prompt(TOKENIZER, HAYSTACK, 300, 0.5, needle)
    assert TOKENIZER.unk_token_id not in prompt + answer
    for value in needle.answers:
        assert "".join(value.split()) in "".join(TOKENIZER.decode(answer).split())


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_has_exact_length_and_needle_at_depth(depth):
    needle = make_needle("niah_words", random.Random(3))
    prompt, answer = build_niah_prompt(TOKENIZER, HAYSTACK, 257, depth, needle)
    assert len(prompt) == 257
    needle_ids = TOKENIZER(" " + needle.needle_texts[0], add_special_tokens=False)["input_ids"]
    question_ids = TOKENIZER(" " + needle.question, add_special_tokens=False)["input_ids"]
    hay_len = 257 - len(needle_ids) - len(question_ids)
    at = round(depth * hay_len)
    assert prompt[at : at + len(needle_ids)] == needle_ids and prompt[-len(question_ids):] == question_ids


def test_needles_are_deterministic_and_errors_are_clear():
    assert make_needle("passkey", random.Random(5)) == make_needle("passkey", random.Random(5))
    assert generate_haystack_text(50, 1) == generate_haystack_text(50, 1) != generate_haystack_text(50, 2)
    with pytest.raises(ValueError, match="'passkee' is unknown; valid templates are"):
        make_needle("passkee", random.Random(0))
    with pytest.raises(ValueError, match="length 10 is too short"):
        build_niah_prompt(TOKENIZER, HAYSTACK, 10, 0.5, make_needle("passkey", random.Random(0)))


def test_synthetic_tokenizer_is_deterministic_and_round_trips_haystack_text():
    again = build_synthetic_tokenizer()
    assert again.get_vocab() == TOKENIZER.get_vocab() and TOKENIZER.unk_token_id not in HAYSTACK
    text = generate_haystack_text(60, seed=4)
    decoded = TOKENIZER.decode(TOKENIZER(text, add_special_tokens=False)["input_ids"])
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_prompts_are_deterministic_under_a_seed_and_bad_arguments_are_named():
    def prompt(seed):
        return build_niah_prompt(TOKENIZER, HAYSTACK, 200, 0.4, make_needle("multikey", random.Random(seed)))

    assert prompt(7) == prompt(7) != prompt(8)
    with pytest.raises(ValueError, match="depth must be in"):
        build_niah_prompt(TOKENIZER, HAYSTACK, 200, 1.5, make_needle("passkey", random.Random(0)))
    with pytest.raises(ValueError, match="haystack_ids is empty"):
        build_niah_prompt(TOKENIZER, [], 200, 0.5, make_needle("passkey", random.Random(0)))
