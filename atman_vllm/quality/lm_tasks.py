"""Tasks with known evidence that a small pretrained LM (SmolLM2-135M-Instruct) really answers.

The demo task's ``"... Q: Where does Otto live? A:"`` does not work on
SmolLM2: the model does not answer in that format. What it does answer is a
natural completion of a sentence (``form="cloze"``): the context, then the
start of a sentence the answer completes. Measured greedy first-token accuracy
of formats tried on SmolLM2-135M-Instruct (float32, 48-60 documents each):

- facts with all four demo relations, 3-6 facts, "So, Otto works in": 60%
  ("works in" vs "lives in" of the same person is confused most: 5/16);
  the chat template with the question as the user turn and "Otto works in"
  as the start of the answer: 58%; "Question: ... Answer: Otto works in": 58%
- objects put in rooms ("Hugo put the ring in the basement.") asked as
  "So, Hugo put the ring in the": 65% (3-4 sentences), 42% (4-6);
  pet names and team captains: 23-50%
- **facts** below (lives in / works as a / owns a / plays the, 3-4 facts,
  "In short, Otto plays the"): 81%
- **day stories** below (one person's day, one detail per sentence):
  82%, and 3% with the evidence sentence cut out

So two families are kept, and of their generated documents only those the
model answers (every target token the greedy choice) enter the evaluation
(``keep_answered``). On the 96 documents per task of the benchmark run the
stricter every-token rate is 67% (facts) and 76% (stories), below the ~80%
hoped for; no better-answered format was found (above). In both, the answer's word occurs in exactly one sentence
of the context: the evidence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .tasks import CITIES, NAMES, RELATIONS, QAExample, Relation, generate_document, without_evidence

# --------------------------------------------------------------------------- facts, as completions

INSTRUMENTS = ("guitar", "piano", "violin", "drums", "flute", "cello", "trumpet", "harp", "banjo", "organ")

_BY_NAME = {r.name: r for r in RELATIONS}
# "works in" is left out: SmolLM2 confuses it with "lives in" of the same person (see above).
LM_FACT_RELATIONS: tuple[Relation, ...] = (
    _BY_NAME["lives_in"], _BY_NAME["job"], _BY_NAME["pet"],
    Relation("plays", INSTRUMENTS, "{e} plays the {v}.", "What does {e} play?", "Who plays the {v}?"),
)
# The start of the sentence whose completion is the value (the fact sentence without its value).
FACT_CLOZE = {"lives_in": "{e} lives in", "job": "{e} works as a", "pet": "{e} owns a", "plays": "{e} plays the"}
FACT_LEAD = "In short,"
LM_FACT_SIZES = (3, 4)


def lm_fact_examples(n: int, seed: int) -> list[QAExample]:
    """Facts documents (3-4 facts) asked as "In short, Otto plays the" -> " guitar"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        doc = generate_document(rng, rng.randint(*LM_FACT_SIZES), relations=LM_FACT_RELATIONS)
        i = rng.randrange(len(doc.facts))
        f = doc.facts[i]
        stem = f"{FACT_LEAD} {FACT_CLOZE[f.relation.name].format(e=f.entity)}"
        out.append(QAExample(doc.context, stem, f.value, (doc.span_of(i),), f"{f.relation.name}:value", "cloze"))
    return out


# --------------------------------------------------------------------------- day stories


@dataclass(frozen=True)
class StorySlot:
    """One detail of a day: its sentence ("{p}": the person or pronoun), its completion stem, its values."""

    name: str
    sentence: str
    stem: str
    values: tuple[str, ...]


STORY_SLOTS: tuple[StorySlot, ...] = (
    StorySlot("city", "{p} woke up in {v}.", "{e} woke up in", CITIES[:20]),
    StorySlot("food", "For breakfast, {p} ate {v}.", "for breakfast, {e} ate",
              ("pancakes", "toast", "porridge", "cereal", "eggs", "rice", "noodles", "soup", "yogurt", "waffles")),
    StorySlot("travel", "Then {p} went to work by {v}.", "{e} went to work by",
              ("bus", "train", "bike", "car", "boat", "tram", "taxi", "ferry")),
    StorySlot("friend", "At lunch, {p} met {v}.", "at lunch, {e} met", NAMES[:12]),
    StorySlot("music", "In the evening, {p} played the {v}.", "in the evening, {e} played the", INSTRUMENTS[:8]),
    StorySlot("drink", "Before bed, {p} drank {v}.", "before bed, {e} drank",
              ("tea", "coffee", "juice", "milk", "water", "lemonade", "cocoa")),
)
STORY_PEOPLE = (("Otto", "he"), ("Paul", "he"), ("Omar", "he"), ("Finn", "he"), ("Hugo", "he"), ("Karl", "he"),
                ("Anna", "she"), ("Vera", "she"), ("Lucy", "she"), ("Sara", "she"), ("Nora", "she"), ("Rosa", "she"))
STORY_FILLERS = ("It was a cold day.", "The sky was grey.", "Nothing else happened.", "The streets were busy.",
                 "The weather was mild.")
STORY_SIZES = (3, 5)  # detail sentences per story (plus at most one filler)


def _capitalised(s: str) -> str:
    return s[0].upper() + s[1:]


def day_story_examples(n: int, seed: int) -> list[QAExample]:
    """One person's day, one detail per sentence, asked as "So, in the evening, Otto played the" -> " drums".

    The first sentence names the person, later ones use the pronoun; half of
    the stories get a filler sentence with no detail. Details are distinct
    kinds, so the answer's word stands in exactly one sentence; the friend is
    never the person.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        person, pronoun = rng.choice(STORY_PEOPLE)
        k = rng.randint(*STORY_SIZES)
        slots = sorted(rng.sample(range(len(STORY_SLOTS)), k))  # a day in order
        sentences: list[tuple[StorySlot | None, str, str | None]] = []
        for j, si in enumerate(slots):
            slot = STORY_SLOTS[si]
            value = rng.choice([v for v in slot.values if v != person])
            sentences.append((slot, _capitalised(slot.sentence.format(p=person if j == 0 else pronoun, v=value)), value))
        if rng.random() < 0.5:
            sentences.insert(rng.randrange(len(sentences) + 1), (None, rng.choice(STORY_FILLERS), None))
        q = rng.choice([j for j, s in enumerate(sentences) if s[0] is not None])
        context = " ".join(s for _, s, _ in sentences)
        start = sum(len(s) + 1 for _, s, _ in sentences[:q])
        slot, sentence, value = sentences[q]
        stem = f"So, {slot.stem.format(e=person)}"
        out.append(QAExample(context, stem, value, ((start, start + len(sentence)),), slot.name, "cloze"))
    return out


TASKS = {"facts": lm_fact_examples, "story": day_story_examples}


# --------------------------------------------------------------------------- does the model answer?


def greedy_answers(hf, examples: Sequence[QAExample]) -> list[bool]:
    """Per example: is every target token the model's greedy choice (teacher forced, one forward each)?

    ``hf`` is a ``baselines.HFModel``; the tokens are AtMan's (``core.encode_input``).
    """
    import torch

    from atman_vllm.core import encode_input

    out = []
    for ex in examples:
        enc = encode_input(hf.tokenizer, ex.prompt, ex.target)
        ids = torch.tensor([list(enc.token_ids)])
        with torch.no_grad():
            pred = hf.model(input_ids=ids).logits[0, enc.target_start - 1:-1].argmax(-1)
        out.append(bool(torch.equal(pred, ids[0, enc.target_start:])))
    return out


@dataclass(frozen=True)
class Selection:
    """The examples the model answers, and what was measured to choose them."""

    examples: list[QAExample]
    candidates: int
    answered: int  # candidates answered correctly
    answered_without_evidence: int  # of the kept ones, still answered with the evidence cut out

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "answered": self.answered, "kept": len(self.examples),
                "accuracy": self.answered / max(1, self.candidates),
                "accuracy_without_evidence": self.answered_without_evidence / max(1, len(self.examples))}


def keep_answered(hf, candidates: Sequence[QAExample], n: int) -> Selection:
    """The first ``n`` candidates the model answers; also how many it still answers without their evidence."""
    ok = greedy_answers(hf, candidates)
    kept = [ex for ex, good in zip(candidates, ok) if good][:n]
    no_ev = sum(greedy_answers(hf, [without_evidence(ex) for ex in kept]))
    return Selection(kept, len(candidates), sum(ok), no_ev)
