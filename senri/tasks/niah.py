"""Needle-in-a-haystack building blocks shared by training-data injection and evaluation.

Templates (written for Senri): ``passkey`` (the classic pass-key retrieval of the passkey papers: a 5-digit key in
the repeated filler ``PASSKEY_FILLER``), ``passkey_sentences`` (the same needle in a haystack of random sentences,
harder and not comparable with published tables), and single needles in the manner of RULER (in Senri's own words,
"The hidden word is …", so that lm-eval's RULER, worded "special magic", stays held out)
``niah_words`` / ``niah_numbers`` / ``niah_uuids`` plus ``multikey`` (distractor needles with other keys),
``multivalue`` (one key, several values, all must be recalled) and ``multiquery`` (several keys asked).
A prompt is: haystack with the needle sentences inserted at a depth, then the question; the answer follows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

TEMPLATES = ("passkey", "passkey_sentences", "niah_words", "niah_numbers", "niah_uuids", "multikey", "multivalue", "multiquery")

# The classic pass-key filler (Mohtashami & Jaggi 2023 and the long-context papers after it), repeated.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Templates whose haystack is the classic filler rather than the given / generated haystack text.
FILLER_TEMPLATES = ("passkey",)

# Values for niah_words and keys for the multi-* templates: never used by the haystack generator.
VALUE_WORDS = (
    "amber", "basalt", "cobalt", "dahlia", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kestrel",
    "lantern", "marble", "nectar", "obsidian", "pepper", "quartz", "raven", "saffron", "thistle", "umber", "velvet",
    "walnut", "yarrow", "zephyr", "anchor", "beacon", "canyon", "dune", "falcon", "glacier", "heron", "ivory",
    "juniper", "kelp", "lotus", "meadow", "nimbus", "orchid", "pebble", "quill", "reef", "sparrow", "tundra",
    "urchin", "violet", "willow", "yucca",
)
KEY_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")

# Haystack vocabulary: plain sentences whose words carry no needle.
_NOUNS = ("river", "forest", "village", "teacher", "garden", "window", "market", "road", "mountain", "child",
          "farmer", "letter", "bridge", "candle", "storm", "ship", "winter", "table", "song", "horse")
_ADJECTIVES = ("quiet", "green", "old", "bright", "cold", "small", "wide", "gentle", "heavy", "distant")
_VERBS = ("crossed", "watched", "found", "carried", "painted", "followed", "remembered", "opened", "lost", "built")
_SENTENCE_FORMS = (
    "The {n1} was {a1} and the {n2} was {a2}.",
    "A {a1} {n1} {v} the {n2} near the {n3}.",
    "In the {a1} morning the {n1} {v} a {n2}.",
    "Nobody {v} the {n1}, so the {n2} stayed {a1}.",
)
# Every word any template or the haystack can produce (the synthetic tokenizer's vocabulary).
_TEMPLATE_WORDS = (
    "the pass key is remember it what hidden word number uuid for are all numbers and of a in "
    "morning nobody so stayed near was"
).split()
_PUNCTUATION = (".", ",", "?", ":", "-")


@dataclass
class Needle:
    """What is hidden and how it is asked. ``answer`` continues the prompt (leading space); ``answers`` are the
    strings that must all appear in the model's continuation."""

    template: str
    needle_texts: list[str]
    question: str
    answer: str
    answers: list[str] = field(default_factory=list)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _uuid(rng: random.Random) -> str:
    hexes = "0123456789abcdef"
    return "-".join("".join(rng.choice(hexes) for _ in range(n)) for n in (8, 4, 4))


def make_needle(template: str, rng: random.Random) -> Needle:
    """A random needle of ``template`` (see TEMPLATES), drawn from ``rng``."""
    if template in ("passkey", "passkey_sentences"):
        key = _number(rng, 5)
        return Needle(template, [f"The pass key is {key}. Remember it. {key} is the pass key."],
                      "What is the pass key? The pass key is", f" {key}", [key])
    if template in ("niah_words", "niah_numbers", "niah_uuids"):
        kind = {"niah_words": "word", "niah_numbers": "number", "niah_uuids": "uuid"}[template]
        value = {"word": lambda: rng.choice(VALUE_WORDS), "number": lambda: _number(rng, 7),
                 "uuid": lambda: _uuid(rng)}[kind]()
        return Needle(template, [f"The hidden {kind} is {value}."],
                      f"What is the hidden {kind}? The hidden {kind} is", f" {value}", [value])
    if template in ("multikey", "multivalue", "multiquery"):
        keys = rng.sample(KEY_WORDS, 4)
        if template == "multivalue":
            values = [_number(rng, 7) for _ in range(3)]
            texts = [f"The hidden number for {keys[0]} is {v}." for v in values]
            return Needle(template, texts, f"What are all the hidden numbers for {keys[0]}? "
                          f"The hidden numbers for {keys[0]} are", " " + " and ".join(values), values)
        values = [_number(rng, 7) for _ in keys]
        texts = [f"The hidden number for {k} is {v}." for k, v in zip(keys, values)]
        rng.shuffle(texts)
        if template == "multikey":  # one key asked, three distractors
            return Needle(template, texts, f"What is the hidden number for {keys[0]}? "
                          f"The hidden number for {keys[0]} is", f" {values[0]}", [values[0]])
        asked = keys[:2]
        return Needle(template, texts, f"What are the hidden numbers for {asked[0]} and {asked[1]}? "
                      f"The hidden numbers for {asked[0]} and {asked[1]} are",
                      f" {values[0]} and {values[1]}", values[:2])
    raise ValueError(f"NIAH template {template!r} is unknown; valid templates are {list(TEMPLATES)}")


def generate_haystack_text(num_words: int, seed: int) -> str:
    """Deterministic filler prose (no needle words) of about ``num_words`` words."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < num_words:
        form = rng.choice(_SENTENCE_FORMS)
        sentence = form.format(n1=rng.choice(_NOUNS), n2=rng.choice(_NOUNS), n3=rng.choice(_NOUNS),
                               a1=rng.choice(_ADJECTIVES), a2=rng.choice(_ADJECTIVES), v=rng.choice(_VERBS))
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


def haystack_text_for(template: str, num_words: int, seed: int, haystack_text: str | None = None) -> str:
    """The haystack of a template: the classic filler for ``passkey``, else ``haystack_text`` or generated prose."""
    if template in FILLER_TEMPLATES:
        return " ".join([PASSKEY_FILLER] * (num_words // 16 + 1))
    return haystack_text or generate_haystack_text(num_words, seed)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_niah_prompt(
    tokenizer, haystack_ids: Sequence[int], length: int, depth: float, needle: Needle
) -> tuple[list[int], list[int]]:
    """(prompt ids of exactly ``length`` tokens ending with the question, answer ids).

    The needle sentences sit together at fraction ``depth`` of the haystack part (0: first tokens, 1: right before
    the question); the haystack ids are cycled to fill.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not haystack_ids:
        raise ValueError("haystack_ids is empty")
    needle_ids = _encode(tokenizer, " " + " ".join(needle.needle_texts))
    question_ids = _encode(tokenizer, " " + needle.question)
    hay_len = length - len(needle_ids) - len(question_ids)
    if hay_len < 0:
        raise ValueError(
            f"length {length} is too short for the {needle.template!r} needle and question "
            f"({len(needle_ids) + len(question_ids)} tokens)"
        )
    hay = [haystack_ids[i % len(haystack_ids)] for i in range(hay_len)]
    at = round(depth * hay_len)
    return hay[:at] + needle_ids + hay[at:] + question_ids, _encode(tokenizer, needle.answer)


def needle_span(prompt_len: int, needle_len: int, question_len: int, depth: float) -> tuple[int, int]:
    """Token positions [start, end) of the needle in a prompt built by :func:`build_niah_prompt`."""
    hay_len = prompt_len - needle_len - question_len
    start = round(depth * hay_len)
    return start, start + needle_len


def build_synthetic_tokenizer():
    """A deterministic word-level tokenizer covering the haystack and every template but ``niah_uuids``
    (digits one per token).

    Used by the tiny from-scratch models of the cpu-smoke and cpu-proof profiles.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = sorted(set(_TEMPLATE_WORDS) | set(_NOUNS) | set(_ADJECTIVES) | set(_VERBS) | set(VALUE_WORDS)
                   | set(KEY_WORDS))
    vocab_list = specials + list(_PUNCTUATION) + [str(d) for d in range(10)] + words
    vocab = {token: i for i, token in enumerate(vocab_list)}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    # Digits one per token, letter runs as words, each punctuation mark alone.
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\d|[a-z]+|[^a-z\d]"), behavior="isolated"),
    ])
    model.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", name_or_path="senri-synthetic-words")


__all__ = [
    "TEMPLATES", "PASSKEY_FILLER", "FILLER_TEMPLATES", "haystack_text_for", "VALUE_WORDS", "Needle", "make_needle", "generate_haystack_text", "build_niah_prompt",
    "needle_span", "build_synthetic_tokenizer",
]
