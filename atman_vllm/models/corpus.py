"""A small built-in English corpus for training the tiny models' tokenizer.

Generated deterministically from templates (no downloads), varied enough
that a byte-level BPE learns whole common words, punctuation and the
``Q: ... A:`` shape of question-answering prompts.
"""

from __future__ import annotations

import random

_NAMES = [
    "Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara",
]
_PLACES = [
    "Paris", "Berlin", "Tokyo", "Lisbon", "Cairo", "Oslo", "Lima", "Toronto", "Madrid", "Vienna",
    "the village", "the harbour", "the old library", "the market", "the mountains", "the river bank",
]
_COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Portugal": "Lisbon", "Egypt": "Cairo",
    "Norway": "Oslo", "Peru": "Lima", "Spain": "Madrid", "Austria": "Vienna", "Italy": "Rome",
}
_ANIMALS = ["cat", "dog", "horse", "owl", "fox", "rabbit", "whale", "eagle", "bear", "turtle"]
_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown"]
_OBJECTS = [
    "book", "letter", "bicycle", "lamp", "garden", "bridge", "boat", "painting", "song", "machine",
    "window", "computer", "recipe", "map", "camera", "violin", "telescope", "notebook",
]
_VERBS_PAST = [
    "found", "built", "painted", "sold", "repaired", "opened", "wrote", "carried", "described",
    "studied", "forgot", "borrowed", "cleaned", "designed", "measured", "discovered",
]
_ADJECTIVES = [
    "quiet", "bright", "ancient", "small", "heavy", "strange", "beautiful", "careful", "famous",
    "cold", "warm", "simple", "complex", "useful", "broken", "modern",
]
_TIMES = [
    "yesterday", "last winter", "in the morning", "after dinner", "on Monday", "in 1998",
    "during the storm", "before sunrise", "at noon", "every summer",
]
_TOPICS = [
    "physics", "history", "music", "mathematics", "biology", "economics", "poetry", "chemistry",
    "astronomy", "geography", "medicine", "language",
]


def _sentence(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    place = rng.choice(_PLACES)
    animal = rng.choice(_ANIMALS)
    colour = rng.choice(_COLOURS)
    obj = rng.choice(_OBJECTS)
    verb = rng.choice(_VERBS_PAST)
    adj = rng.choice(_ADJECTIVES)
    when = rng.choice(_TIMES)
    topic = rng.choice(_TOPICS)
    country = rng.choice(sorted(_COUNTRIES))
    number = rng.randint(2, 2024)
    templates = [
        f"{name} {verb} a {adj} {obj} in {place} {when}.",
        f"The {colour} {animal} slept near {place} while {name} read about {topic}.",
        f"Why did {name} give the {obj} to {other}? Because it was {adj}.",
        f"{name} said: \"I have {number} {obj}s, and every one of them is {colour}.\"",
        f"In {place}, the {adj} {animal} watched {other} walk home {when}.",
        f"The capital of {country} is {_COUNTRIES[country]}.",
        f"{name} lives in {place}. Q: Where does {name} live? A: {place}",
        f"Q: What colour is the {animal}? A: The {animal} is {colour}.",
        f"{other} teaches {topic} at a {adj} school, and {name} studies {topic} there too.",
        f"After {number} days, {name} finally {verb} the {obj}; {other} was surprised.",
        f"It was {adj} and {colour} outside {when}, so {name} stayed in {place}.",
        f"Many people think that {topic} is {adj}, but {name} disagrees!",
        f"{name} and {other} {verb} {number} {obj}s together {when}.",
        f"The {obj} was {adj}. {name} {verb} it anyway, then went to {place}.",
        f"Question: who {verb} the {obj}? Answer: {name} did, {when}.",
    ]
    return rng.choice(templates)


def tiny_corpus(num_sentences: int = 600, seed: int = 1234) -> list[str]:
    """Return ``num_sentences`` lines of English text, the same for the same seed.

    Lines are grouped into short paragraphs (blank line between) so the
    tokenizer sees newlines and paragraph breaks too.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < num_sentences:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
        lines.append(paragraph)
        if rng.random() < 0.3:
            lines.append("")
    return lines
