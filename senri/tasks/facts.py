"""Facts stated once in natural prose and asked back later in other words: the text-memory task.

A fact has a *kind* (a pet's name, the city someone lives in, the code of a door, the colour of a thing), a subject
and a value. It is written into a haystack of real sentences by a statement template and asked at the end by a
question template worded differently from the statement (``Question: … Answer:``); the answer is the value and a
full stop, then the end token, so a model that learned it stops after answering.

Every kind splits its statement templates, question templates, subjects and values into a training part and a
held-out part (:func:`fact_pool`): evaluation asks held-out subjects with held-out values, stated and asked in
held-out wording, inside held-out documents (:mod:`senri.tasks.corpus`). Distractors are other facts of the same
kind, with other subjects and values, in the same haystack.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .corpus import Document, sentences

FACT_SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class FactKind:
    """One shape of fact. Templates use ``{subject}`` / ``{Subject}`` (capitalised) and ``{value}``; ``values`` is
    None for numbers (drawn at random: four to six digits)."""

    name: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    subjects: tuple[str, ...]
    values: tuple[str, ...] | None


_OWNERS = ("my neighbour", "the baker", "the old sailor", "my aunt", "the librarian", "the head gardener",
           "the new teacher", "the blacksmith", "our landlord", "the village doctor", "the shepherd", "the ferryman",
           "the mayor", "the innkeeper", "my grandfather", "the lighthouse keeper")
_ANIMALS = ("cat", "dog", "parrot", "horse", "goat", "tortoise", "donkey", "rabbit")

KINDS = (
    FactKind(
        "pet",
        statements=("{Subject} is called {value}.", "{Subject} goes by the name {value}.",
                    "The children named {subject} {value}.", "{Subject} answers only to {value}."),
        questions=("What is {subject} called?", "What is the name of {subject}?", "By what name is {subject} known?"),
        subjects=tuple(f"{owner}'s {animal}" for owner in _OWNERS for animal in _ANIMALS),
        values=("Biscuit", "Pemberton", "Quillfeather", "Marzipan", "Thistle", "Bartholomew", "Juniper", "Wolfgang",
                "Clementine", "Montgomery", "Persephone", "Rutherford", "Evangeline", "Pickles", "Saffron", "Horatio",
                "Tobias", "Winifred", "Archibald", "Mirabel", "Cornelius", "Ophelia", "Barnaby", "Lavinia", "Fitzgerald",
                "Rosalind", "Ignatius", "Beatrix", "Leopold", "Gwendolyn", "Percival", "Henrietta"),
    ),
    FactKind(
        "city",
        statements=("{Subject} moved to {value}.", "{Subject} now lives in {value}.",
                    "{Subject} has settled in {value}.", "{Subject} made a new home in {value}."),
        questions=("Which city does {subject} live in?", "Where does {subject} live now?",
                   "In what city can {subject} be found these days?"),
        subjects=("the retired judge", "my old schoolfriend", "the violin maker", "the harbour pilot", "the night nurse",
                  "the travelling salesman", "the youngest sister", "the bookbinder", "the chess champion",
                  "the museum guard", "the glassblower", "the former mayor", "the piano tuner", "the cartographer",
                  "the stonemason", "the beekeeper"),
        values=("Lisbon", "Oslo", "Toronto", "Nairobi", "Krakow", "Valparaiso", "Adelaide", "Montreal", "Bergen",
                "Seville", "Kyoto", "Dublin", "Marseille", "Tbilisi", "Hanoi", "Quito", "Helsinki", "Porto", "Zagreb",
                "Edinburgh", "Lyon", "Vienna", "Glasgow", "Florence"),
    ),
    FactKind(
        "code",
        statements=("The code for {subject} is {value}.", "The lock on {subject} opens with {value}.",
                    "The number that opens {subject} is {value}.", "The combination of {subject} is {value}."),
        questions=("What is the code for {subject}?", "Which number opens {subject}?",
                   "What must be entered to unlock {subject}?"),
        subjects=("the storeroom", "the garden gate", "the east tower", "the old safe", "the boathouse",
                  "the archive", "the wine cellar", "the radio room", "the back office", "the attic",
                  "the chapel vault", "the tool shed", "the map room", "the north door", "the clock tower",
                  "the greenhouse"),
        values=None,
    ),
    FactKind(
        "colour",
        statements=("{Subject} was painted {value}.", "The colour of {subject} is {value}.",
                    "{Subject} has been painted a bright {value}.", "{Subject} is now a deep {value}."),
        questions=("What colour is {subject}?", "What colour was {subject} painted?",
                   "Which colour did {subject} end up being?"),
        subjects=("the front door of the inn", "the fisherman's boat", "the school bus", "the garden bench",
                  "the old bicycle", "the village pump", "the market stall", "the kitchen table", "the church gate",
                  "the postbox", "the carriage", "the wooden bridge", "the signal box", "the bakery shutters",
                  "the rowing boat", "the bandstand"),
        values=("crimson", "turquoise", "ochre", "lavender", "scarlet", "emerald", "maroon", "teal", "amber",
                "ivory", "cobalt", "olive", "saffron", "magenta", "indigo", "silver"),
    ),
)
KIND_NAMES = tuple(kind.name for kind in KINDS)


def _held_out(index: int) -> bool:
    return index % 4 == 3  # every fourth subject and value


@dataclass(frozen=True)
class FactPool:
    """The templates and entities of one kind on one side of the split."""

    kind: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    subjects: tuple[str, ...]
    values: tuple[str, ...] | None


def fact_pool(kind: str, split: str) -> FactPool:
    """Kind ``kind``'s ``split`` part: the last statement and question template and every fourth subject and value
    are held out; training gets the rest."""
    if split not in FACT_SPLITS:
        raise ValueError(f"split {split!r} is not valid; valid splits are {list(FACT_SPLITS)}")
    matches = [k for k in KINDS if k.name == kind]
    if not matches:
        raise ValueError(f"fact kind {kind!r} is unknown; valid kinds are {list(KIND_NAMES)}")
    k, held = matches[0], split == "heldout"
    pick = lambda items: tuple(x for i, x in enumerate(items) if _held_out(i) == held)  # noqa: E731
    if k.name == "pet":  # subjects share owners: hold out by owner, so no held-out owner is ever trained on
        subjects = tuple(f"{owner}'s {animal}" for i, owner in enumerate(_OWNERS) if _held_out(i) == held
                         for animal in _ANIMALS)
    else:
        subjects = pick(k.subjects)
    return FactPool(k.name, k.statements[-1:] if held else k.statements[:-1],
                    k.questions[-1:] if held else k.questions[:-1], subjects,
                    None if k.values is None else pick(k.values))


@dataclass
class Fact:
    """A drawn fact: its statement sentence, the question, and the value (what the answer must contain)."""

    kind: str
    subject: str
    value: str
    statement: str
    question: str
    lead: str


def _fill(template: str, subject: str, value: str) -> str:
    return template.format(subject=subject, Subject=subject[0].upper() + subject[1:], value=value)


def draw_facts(kind: str, split: str, rng: random.Random, count: int = 1) -> list[Fact]:
    """``count`` facts of ``kind`` with distinct subjects and values from the ``split`` pool (the first is the one
    asked; the others are distractors)."""
    pool = fact_pool(kind, split)
    subjects = rng.sample(pool.subjects, count)
    if pool.values is None:
        values = []
        while len(values) < count:
            digits = rng.randint(4, 6)
            value = str(rng.randrange(10 ** (digits - 1), 10**digits))
            if value not in values:
                values.append(value)
    else:
        values = rng.sample(pool.values, count)
    facts = []
    for s, v in zip(subjects, values):
        statement = _fill(rng.choice(pool.statements), s, v)
        facts.append(Fact(kind, s, v, statement, _fill(rng.choice(pool.questions), s, v),
                          statement[: statement.rindex(" " + v)]))
    return facts


QUESTION_FORMAT = "\n\nQuestion: {question}\nAnswer: {lead}"


@dataclass
class FactCase:
    """A prompt (haystack with the statements, then the question), the answer's tokens, where the asked fact sits.

    ``ids`` is prompt then answer; ``answer_start`` where the answer begins; ``value_tokens`` how many of the
    answer's tokens are the value itself (then the full stop and the end token, if any); ``needle`` the asked
    statement's token span; ``key`` the value."""

    ids: list[int]
    answer_start: int
    value_tokens: int
    needle: tuple[int, int]
    key: str
    kind: str


MAX_HAYSTACK_DRAWS = 100  # starting sentences a fact case tries before it gives up


class Haystack:
    """Sentences of documents, tokenised once each, read as one endless sequence from a chosen starting sentence."""

    def __init__(self, tokenizer: Any, docs: Sequence[Document]):
        if not docs:
            raise ValueError("a haystack needs at least one document")
        self.tokenizer = tokenizer
        self.sentences = [s for d in docs for s in sentences(d.text)]
        if not self.sentences:
            raise ValueError("the haystack's documents have no sentences")
        self._ids: dict[int, list[int]] = {}

    def sentence_ids(self, index: int) -> list[int]:
        index %= len(self.sentences)
        if index not in self._ids:
            self._ids[index] = list(self.tokenizer(" " + self.sentences[index], add_special_tokens=False)["input_ids"])
        return self._ids[index]

    def take(self, start: int, budget: int) -> list[list[int]]:
        """Whole sentences from sentence ``start`` on, as many as fit in ``budget`` tokens (at least one)."""
        taken, used = [], 0
        while True:
            ids = self.sentence_ids(start + len(taken))[:budget]
            if taken and used + len(ids) > budget:
                return taken
            taken.append(ids)
            used += len(ids)


def fact_case(tokenizer: Any, haystack: Haystack, length: int, rng: random.Random, split: str,
              kinds: Sequence[str] = KIND_NAMES, distractors: int = 0, min_distance: int = 0,
              depth: tuple[float, float] | None = None, end: bool = False) -> FactCase:
    """A fact case of at most ``length`` tokens (answer excluded): sentences of ``haystack`` with the asked fact (and
    ``distractors`` others of its kind) between two sentences, the question last.

    The asked statement ends at least ``min_distance`` tokens before the question, at a depth drawn from ``depth``
    (fractions of the haystack) when given, else uniformly as far back as the haystack allows. With ``end`` the
    answer is the value, a full stop and the end token (what training teaches); without, the value alone (what
    evaluation scores, so that the base model is not asked to end the way training taught Senri)."""
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    kind = rng.choice(list(kinds))
    facts = draw_facts(kind, split, rng, 1 + distractors)
    asked = facts[0]
    statements = [encode(" " + f.statement) for f in facts]
    question = encode(QUESTION_FORMAT.format(question=asked.question, lead=asked.lead))
    value = encode(" " + asked.value)
    answer = value + (encode(".") + [tokenizer.eos_token_id] if end else [])
    budget = length - sum(map(len, statements)) - len(question)
    if budget < min_distance:
        raise ValueError(f"length {length} leaves no room for a fact {min_distance} tokens before the question")
    # A stretch stops at the first sentence that does not fit, so one that meets a very long sentence early can be
    # too short for min_distance: then the stretch starts at another sentence (a stretch that fits is kept as drawn).
    for _ in range(MAX_HAYSTACK_DRAWS):
        hay = haystack.take(rng.randrange(len(haystack.sentences)), budget)
        total = sum(map(len, hay))
        # Sentence boundaries whose distance to the question is at least min_distance.
        ends = [0]
        for s in hay:
            ends.append(ends[-1] + len(s))
        allowed = [i for i, e in enumerate(ends) if total - e >= min_distance]
        if allowed:
            break
    else:
        raise ValueError(f"no stretch of the haystack's sentences puts a fact {min_distance} tokens before the "
                         f"question within {length} tokens ({MAX_HAYSTACK_DRAWS} starting sentences tried)")
    if depth is not None:
        at = min(allowed, key=lambda i: abs(ends[i] - rng.uniform(*depth) * total))
    else:
        at = rng.choice(allowed)
    places = sorted(rng.randrange(len(hay) + 1) for _ in range(distractors))
    pieces: list[list[int]] = []
    needle_start = 0
    for i, sentence in enumerate(hay + [[]]):
        for j, place in enumerate(places):
            if place == i:
                pieces.append(statements[1 + j])
        if i == at:
            needle_start = sum(map(len, pieces))
            pieces.append(statements[0])
        pieces.append(sentence)
    prompt = [t for piece in pieces for t in piece] + question
    return FactCase(prompt + answer, len(prompt), len(value), (needle_start, needle_start + len(statements[0])),
                    asked.value, kind)


def fact_cases(tokenizer: Any, docs: Sequence[Document], length: int, num_cases: int, seed: int,
               depths: tuple[float, float], split: str = "heldout", kinds: Sequence[str] = KIND_NAMES,
               distractors: int = 1) -> list[FactCase]:
    """``num_cases`` evaluation cases (answer: the value alone) with the asked fact at a depth in ``depths``; a case
    depends only on (seed, length, index) and the documents."""
    haystack = Haystack(tokenizer, docs)
    return [fact_case(tokenizer, haystack, length, random.Random(f"fact-{seed}-{length}-{i}"), split, kinds,
                      distractors, depth=depths) for i in range(num_cases)]


__all__ = ["FACT_SPLITS", "FactKind", "KINDS", "KIND_NAMES", "FactPool", "fact_pool", "Fact", "draw_facts",
           "QUESTION_FORMAT", "FactCase", "Haystack", "fact_case", "fact_cases"]
