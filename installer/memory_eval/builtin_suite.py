"""The built-in suite: generated multi-session conversations, the same for the same size and seed.

A user tells an assistant about their life over several sessions: facts, facts corrected later,
preferences, and two-part facts (who someone is, then something about them), each followed by
filler turns that include near-misses about other people. Every fact is asked about once, after
the whole history.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from installer.memory_eval.conversations import Conversation, Dataset, DatasetError, Question
from installer.sidecar_client import Message

KINDS = ("fact", "correction", "preference", "multi-hop")
MAX_FACTS = 16

SYSTEM_PROMPT = (
    "You are a personal assistant with a good memory. The user talks to you over several sessions "
    "about their life. When the user asks a question, answer with only the answer, in a few words."
)


@dataclass(frozen=True)
class SuiteSize:
    """How big the generated suite is."""

    conversations: int = 4
    facts: int = 8
    distractors: int = 2
    sessions: int = 3

    def validate(self) -> None:
        """Raise DatasetError naming the first size that cannot be generated."""
        if self.conversations < 1:
            raise DatasetError("--conversations must be at least 1")
        if not 1 <= self.facts <= MAX_FACTS:
            raise DatasetError(f"--facts must be between 1 and {MAX_FACTS}")
        if self.distractors < 0:
            raise DatasetError("--distractors cannot be negative")
        if self.sessions < 1:
            raise DatasetError("--sessions must be at least 1")


@dataclass(frozen=True)
class _Attribute:
    tell: str
    correct: str
    ask: str
    near_miss: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class _Preference:
    tell: str
    ask: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class _Hop:
    link: str
    fact: str
    ask: str
    values: tuple[str, ...]


_JOBS = ("nurse", "carpenter", "pilot", "librarian", "chemist", "translator", "baker", "dentist", "plumber")
_CITIES = ("Lisbon", "Oslo", "Porto", "Kyoto", "Denver", "Tallinn", "Valencia", "Montreal")
_COLOURS = ("red", "blue", "green", "silver", "yellow", "black", "orange", "white")
_INSTRUMENTS = ("cello", "violin", "trumpet", "banjo", "harp", "flute", "piano", "saxophone")
_ALLERGENS = ("peanuts", "shellfish", "pollen", "penicillin", "strawberries", "sesame", "latex")
_MONTHS = ("January", "March", "April", "June", "July", "September", "October", "December")

_ATTRIBUTES = (
    _Attribute(
        "My cat is called {value}.",
        "Small correction: my cat is actually called {value}, not {old}.",
        "What is my cat called?",
        "My neighbour's cat is called {value}.",
        ("Miso", "Biscuit", "Pepper", "Luna", "Tofu", "Ziggy", "Mochi", "Nugget"),
    ),
    _Attribute(
        "I live in {value}.",
        "Big news: I moved away from {old} and now live in {value}.",
        "Which city do I live in now?",
        "My cousin lives in {value}.",
        _CITIES,
    ),
    _Attribute(
        "I work as a {value}.",
        "I changed careers: I am no longer a {old}, I work as a {value} now.",
        "What is my job?",
        "My brother works as a {value}.",
        _JOBS,
    ),
    _Attribute(
        "My car is {value}.",
        "I sold the {old} car; my new car is {value}.",
        "What colour is my car?",
        "My colleague's car is {value}.",
        _COLOURS,
    ),
    _Attribute(
        "I play {value} every Saturday.",
        "I stopped playing {old}; on Saturdays I play {value} now.",
        "Which sport do I play on Saturdays?",
        "My friend plays {value} on Sundays.",
        ("tennis", "badminton", "volleyball", "squash", "hockey", "rugby", "handball", "cricket"),
    ),
    _Attribute(
        "I am learning to play the {value}.",
        "I gave up the {old}; I am learning the {value} instead.",
        "Which instrument am I learning to play?",
        "My daughter plays the {value}.",
        _INSTRUMENTS,
    ),
    _Attribute(
        "My birthday is in {value}.",
        "I got my birthday wrong earlier: it is in {value}, not {old}.",
        "In which month is my birthday?",
        "My father's birthday is in {value}.",
        _MONTHS,
    ),
    _Attribute(
        "I am allergic to {value}.",
        "The doctor says I am not allergic to {old} after all; I am allergic to {value}.",
        "What am I allergic to?",
        "My aunt is allergic to {value}.",
        _ALLERGENS,
    ),
)

_PREFERENCES = (
    _Preference(
        "I always order {value}, never {other}.",
        "What do I always order to drink?",
        ("green tea", "black coffee", "hot chocolate", "orange juice", "sparkling water", "mint tea"),
    ),
    _Preference(
        "On flights I always pick {value} seats; I avoid {other} seats.",
        "Which seats do I pick on flights?",
        ("window", "aisle", "exit-row", "front-row"),
    ),
    _Preference(
        "My favourite food is {value}; I am not keen on {other}.",
        "What is my favourite food?",
        ("Thai curry", "sushi", "lasagne", "tacos", "ramen", "falafel", "paella"),
    ),
    _Preference(
        "I love {value} and cannot stand {other}.",
        "Which season do I love?",
        ("spring", "summer", "autumn", "winter"),
    ),
    _Preference(
        "I mostly listen to {value}, hardly ever {other}.",
        "What music do I mostly listen to?",
        ("jazz", "techno", "folk", "opera", "reggae", "blues"),
    ),
    _Preference(
        "For holidays I prefer the {value} to the {other}.",
        "Where do I prefer to go on holiday?",
        ("mountains", "seaside", "countryside", "desert"),
    ),
)

_HOPS = (
    _Hop("My sister is called {name}.", "{name} works as a {value} these days.",
         "What does my sister do for a living?", _JOBS),
    _Hop("My best friend is {name}.", "{name} has just moved to {value}.",
         "Which city did my best friend move to?", _CITIES),
    _Hop("My manager's name is {name}.", "{name}'s car is {value}.",
         "What colour is my manager's car?", _COLOURS),
    _Hop("My son is called {name}.", "{name} has started playing the {value}.",
         "Which instrument does my son play?", _INSTRUMENTS),
    _Hop("My neighbour is {name}.", "{name} is allergic to {value}.",
         "What is my neighbour allergic to?", _ALLERGENS),
)

_NAMES = ("Lena", "Marta", "Priya", "Ines", "Yuki", "Nora", "Omar", "Felix", "Tomas", "Amara", "Ravi", "Sofia")

_SMALL_TALK = (
    "The weather was grey and windy today.",
    "I watched a documentary about bridges last night.",
    "Traffic on the way home was terrible.",
    "I tried a new bread recipe this weekend.",
    "My phone battery keeps dying lately.",
    "I read a few chapters of a detective novel.",
    "We had a long meeting about the budget at work.",
    "I went for a walk by the river this morning.",
    "The supermarket was out of eggs again.",
    "I finally fixed the squeaky door in the hallway.",
    "I am thinking about repainting the kitchen.",
    "I slept badly because of the noise outside.",
)

_ACKS = ("Got it.", "Noted.", "Thanks, I will remember that.", "Understood.", "Okay!", "Good to know.")


def builtin_suite(size: SuiteSize, seed: int) -> Dataset:
    """Generate the suite; the same size and seed always give the same conversations."""
    size.validate()
    conversations = tuple(
        _conversation(index, size, random.Random(f"builtin:{seed}:{index}")) for index in range(size.conversations)
    )
    return Dataset("builtin", conversations, params={**dataclasses.asdict(size), "seed": seed})


def _conversation(index: int, size: SuiteSize, rng: random.Random) -> Conversation:
    kinds = [KINDS[i % len(KINDS)] for i in range(size.facts)]
    attributes = iter(rng.sample(_ATTRIBUTES, kinds.count("fact") + kinds.count("correction")))
    preferences = iter(rng.sample(_PREFERENCES, kinds.count("preference")))
    hops = iter(rng.sample(_HOPS, kinds.count("multi-hop")))
    names = iter(rng.sample(_NAMES, kinds.count("multi-hop")))
    early: list[str] = []  # told first
    late: list[str] = []  # corrections and second halves of two-part facts, told after all of `early`
    asked: list[tuple[str, str, str]] = []  # (kind, question, answer)
    taken: dict[str, str] = {}  # near-miss template -> the user's own value, which a near-miss must not repeat
    for kind in kinds:
        if kind == "fact":
            attribute = next(attributes)
            value = rng.choice(attribute.values)
            early.append(attribute.tell.format(value=value))
            taken[attribute.near_miss] = value
            asked.append((kind, attribute.ask, value))
        elif kind == "correction":
            attribute = next(attributes)
            old, value = rng.sample(attribute.values, 2)
            early.append(attribute.tell.format(value=old))
            late.append(attribute.correct.format(value=value, old=old))
            taken[attribute.near_miss] = value
            asked.append((kind, attribute.ask, value))
        elif kind == "preference":
            preference = next(preferences)
            value, other = rng.sample(preference.values, 2)
            early.append(preference.tell.format(value=value, other=other))
            asked.append((kind, preference.ask, value))
        else:
            hop, name = next(hops), next(names)
            value = rng.choice(hop.values)
            early.append(hop.link.format(name=name))
            late.append(hop.fact.format(name=name, value=value))
            asked.append((kind, hop.ask, value))
    rng.shuffle(early)
    rng.shuffle(late)
    said: list[str] = []
    for statement in early + late:
        said.append(statement)
        said.extend(_filler(rng, taken) for _ in range(size.distractors))
    conversation_id = f"builtin-{index + 1}"
    rng.shuffle(asked)
    questions = tuple(
        Question(f"{conversation_id}-q{n + 1}", text, (answer,), kind, key_terms=(answer,))
        for n, (kind, text, answer) in enumerate(asked)
    )
    return Conversation(conversation_id, SYSTEM_PROMPT, _as_sessions(said, size.sessions, rng), questions)


def _filler(rng: random.Random, taken: dict[str, str]) -> str:
    if rng.random() < 0.5:
        return rng.choice(_SMALL_TALK)
    attribute = rng.choice(_ATTRIBUTES)
    own = taken.get(attribute.near_miss)
    return attribute.near_miss.format(value=rng.choice([v for v in attribute.values if v != own]))


def _as_sessions(said: list[str], sessions: int, rng: random.Random) -> tuple[Message, ...]:
    count = min(sessions, len(said))
    starts = {round(k * len(said) / count): k + 1 for k in range(count)}
    messages: list[Message] = []
    for i, text in enumerate(said):
        if i in starts:
            text = f"[Session {starts[i]} of {count}] {text}"
        messages.append(Message("user", text))
        messages.append(Message("assistant", rng.choice(_ACKS)))
    return tuple(messages)
