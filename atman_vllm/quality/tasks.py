"""Question-answering tasks whose ground-truth explanation is known.

Two sources feed the same ``QAExample``:

- ``generate_examples``: a synthetic "facts about people" task. A document is a
  handful of one-sentence facts ("Otto lives in Lisbon. Mira works as a
  pilot."); the question's answer is copied from exactly one of them, so the
  evidence (that fact's sentence) is known exactly. Distractor facts share the
  entity ("Otto works in Porto."), the relation ("Mira lives in Oslo.") or even
  the answer's value ("Mira works in Lisbon." next to "Who lives in Lisbon?"),
  so a model has to read the right sentence, not just the right word.
- ``load_squad``: SQuAD-format JSON. SQuAD labels the answer span, not a
  sentence; the evidence span here is the sentence(s) of the context that
  contain the answer span (the same sentences AtMan's sentence units are), so both
  sources are scored against sentence-level evidence.

The prompt format is the paper's (ATMAN_SPEC §8): ``"{context} Q: {question} A:"``
with target ``" {answer}"`` (``form="qa"``). A pretrained LM that does not
follow that format is asked by a natural completion instead (``form="cloze"``:
``"{context} {question}"`` where the question is the start of a sentence the
answer completes, e.g. ``"So, Otto plays the"``; atman_vllm/quality/lm_tasks.py).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from atman_vllm.core.units import sentence_spans  # the same sentences AtMan's sentence units are

# --------------------------------------------------------------------------- data

PROMPT_FORMS = ("qa", "cloze")


@dataclass(frozen=True)
class QAExample:
    """One question about a context, with its evidence as character spans.

    ``evidence_spans`` are ``(start, end)`` character offsets into ``context``
    (end exclusive); the answer text occurs inside one of them.
    """

    context: str
    question: str
    answer: str
    evidence_spans: tuple[tuple[int, int], ...]
    qtype: str
    # "qa": "{context} Q: {question} A:" (the paper's); "cloze": "{context} {question}",
    # the question being a sentence start the answer completes. The context starts the prompt in both.
    form: str = "qa"

    def __post_init__(self) -> None:
        if self.form not in PROMPT_FORMS:
            raise ValueError(f"form must be one of {', '.join(PROMPT_FORMS)}, not {self.form!r}")

    @property
    def prompt(self) -> str:
        if self.form == "cloze":
            return f"{self.context} {self.question}"
        return f"{self.context} Q: {self.question} A:"

    @property
    def target(self) -> str:
        return f" {self.answer}"

    def answer_spans(self) -> tuple[tuple[int, int], ...]:
        """Where the answer text occurs inside the evidence: the paper's label (ATMAN_SPEC §8).

        The first occurrence inside each evidence span; empty if there is none.
        """
        spans = []
        for s, e in self.evidence_spans:
            at = self.context.find(self.answer, s, e)
            if at >= 0:
                spans.append((at, at + len(self.answer)))
        return tuple(spans)

    def evidence_text(self) -> list[str]:
        return [self.context[s:e] for s, e in self.evidence_spans]

    def to_dict(self) -> dict:
        return {
            "context": self.context,
            "question": self.question,
            "answer": self.answer,
            "evidence_spans": [list(s) for s in self.evidence_spans],
            "qtype": self.qtype,
            "form": self.form,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QAExample":
        return cls(d["context"], d["question"], d["answer"],
                   tuple((int(s), int(e)) for s, e in d["evidence_spans"]), d["qtype"], d.get("form", "qa"))


def without_evidence(example: QAExample) -> QAExample:
    """The same question with every evidence sentence cut out of the context.

    Used to check that the model really reads the evidence: with it gone the
    answer should (mostly) be wrong. The returned example has no evidence.
    """
    parts, pos = [], 0
    for s, e in sorted(example.evidence_spans):
        parts.append(example.context[pos:s])
        pos = e
    parts.append(example.context[pos:])
    context = re.sub(r"\s+", " ", "".join(parts)).strip()
    return QAExample(context, example.question, example.answer, (), example.qtype, example.form)


# --------------------------------------------------------------------------- synthetic task

NAMES = (
    "Otto", "Mira", "Lena", "Hugo", "Ines", "Karl", "Nora", "Ivan", "Rosa", "Tim",
    "Anna", "Paul", "Vera", "Omar", "Lucy", "Finn", "Sara", "Jonas", "Eva", "Max",
    "Ada", "Ben", "Cleo", "Dan", "Elsa", "Felix", "Greta", "Henry", "Ida", "Jack",
    "Kira", "Leo", "Maya", "Nils", "Olga", "Pia", "Rita", "Sam", "Tara", "Uwe",
)
CITIES = (
    "Lisbon", "Oslo", "Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Dublin", "Athens",
    "Warsaw", "Zurich", "Munich", "Milan", "Porto", "Geneva", "Hamburg", "Lyon", "Seville", "Bergen",
    "Krakow", "Turin", "Naples", "Valencia", "Bristol", "Leeds", "Tokyo", "Cairo", "Lima", "Quito",
    "Boston", "Denver", "Austin", "Seattle", "Toronto", "Sydney", "Perth", "Delhi", "Seoul", "Nairobi",
)
JOBS = (
    "pilot", "baker", "doctor", "teacher", "farmer", "lawyer", "painter", "nurse", "singer", "dentist",
    "tailor", "writer", "chef", "driver", "plumber", "banker", "judge", "poet", "sailor", "barber",
    "potter", "miner", "guard", "cook", "vet", "coach", "clerk", "dancer", "soldier", "builder",
)
PETS = (
    "cat", "dog", "parrot", "horse", "goat", "rabbit", "turtle", "hamster", "pony", "snake",
    "duck", "goose", "lizard", "ferret", "donkey", "pig", "sheep", "cow", "frog", "mouse",
)


@dataclass(frozen=True)
class Relation:
    """A kind of fact: its sentence and the two questions it answers."""

    name: str
    values: tuple[str, ...]
    fact: str  # "{e}" entity, "{v}" value
    ask_value: str  # question whose answer is the value
    ask_entity: str  # question whose answer is the entity


RELATIONS: tuple[Relation, ...] = (
    Relation("lives_in", CITIES, "{e} lives in {v}.", "Where does {e} live?", "Who lives in {v}?"),
    Relation("works_in", CITIES, "{e} works in {v}.", "Where does {e} work?", "Who works in {v}?"),
    Relation("job", JOBS, "{e} works as a {v}.", "What is the job of {e}?", "Who works as a {v}?"),
    Relation("pet", PETS, "{e} owns a {v}.", "What pet does {e} own?", "Who owns a {v}?"),
)

# qtype names: "<relation>:value" asks for the value, "<relation>:entity" for the person.
QTYPES: tuple[str, ...] = tuple(f"{r.name}:{d}" for r in RELATIONS for d in ("value", "entity"))


# The demo task asks for values only. Questions asking for the person
# ("Who lives in Lisbon?") need the answer copied from *before* the matched
# words; the 2-layer demo model does not learn that within the training budget
# (docs/quality.md), so they are an opt-in harder variant.
DEMO_ASKS: tuple[str, ...] = ("value",)

SHARE_VALUE_P = 0.4  # chance that a city fact reuses a city of the other city relation


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: Relation
    value: str

    @property
    def sentence(self) -> str:
        return self.relation.fact.format(e=self.entity, v=self.value)


@dataclass(frozen=True)
class Document:
    """A generated context with its facts (for building several questions)."""

    facts: tuple[Fact, ...]

    @property
    def context(self) -> str:
        return " ".join(f.sentence for f in self.facts)

    def span_of(self, index: int) -> tuple[int, int]:
        start = sum(len(f.sentence) + 1 for f in self.facts[:index])
        return start, start + len(self.facts[index].sentence)

    def question(self, index: int, ask: str) -> QAExample:
        """The question about fact ``index``; ``ask`` is "value" or "entity"."""
        fact = self.facts[index]
        rel = fact.relation
        if ask == "value":
            q, a = rel.ask_value.format(e=fact.entity), fact.value
        elif ask == "entity":
            q, a = rel.ask_entity.format(v=fact.value), fact.entity
        else:
            raise ValueError(f"ask must be 'value' or 'entity', not {ask!r}")
        return QAExample(self.context, q, a, (self.span_of(index),), f"{rel.name}:{ask}")


def generate_document(rng: random.Random, n_facts: int,
                      relations: tuple[Relation, ...] = RELATIONS) -> Document:
    """``n_facts`` facts about about n_facts/2 people, every question unambiguous.

    ``relations`` restricts the kinds of facts (training uses single-relation
    documents, where only the person tells the facts apart).

    Uniqueness rules (what makes every question have exactly one answer): a
    person has at most one fact per relation, and a value occurs at most once
    per relation. The same city may appear under ``lives_in`` and ``works_in``
    (a distractor sharing the answer's value).
    """
    if not 1 <= n_facts <= 16:
        raise ValueError("n_facts must be in 1..16")
    # About two facts per person: distractors that share the entity are common.
    n_entities = max(1, min(len(NAMES), (n_facts + 1) // 2 + rng.randint(0, 1)))
    n_entities = max(n_entities, -(-n_facts // len(relations)))
    entities = rng.sample(NAMES, n_entities)
    slots = rng.sample([(e, r) for e in entities for r in relations], n_facts)
    used: dict[str, set[str]] = {r.name: set() for r in relations}
    facts = []
    for entity, rel in slots:
        # A person never lives and works in the same city: the answer's word
        # then occurs in exactly one sentence about that person.
        own = {f.value for f in facts if f.entity == entity}
        free = [v for v in rel.values if v not in used[rel.name] and v not in own]
        # Value-sharing distractors: reuse a city of the other city relation
        # ("Mira works in Lisbon." next to "Otto lives in Lisbon.").
        shared = [v for r in relations if r is not rel and r.values is rel.values
                  for v in sorted(used[r.name]) if v in free and v not in used[rel.name]]
        value = rng.choice(shared) if shared and rng.random() < SHARE_VALUE_P else rng.choice(free)
        used[rel.name].add(value)
        facts.append(Fact(entity, rel, value))
    rng.shuffle(facts)
    return Document(tuple(facts))


def generate_examples(n: int, seed: int, n_facts: tuple[int, int] = (3, 8),
                      asks: tuple[str, ...] = DEMO_ASKS) -> list[QAExample]:
    """``n`` examples, deterministic for a given ``seed``.

    Each example is one document of ``n_facts[0]..n_facts[1]`` facts and one
    question about a uniformly chosen fact, asking for what ``asks`` allows:
    its value ("Where does Otto live?", the default: the demo task) and/or its
    person ("Who lives in Lisbon?").
    """
    if not asks or set(asks) - {"value", "entity"}:
        raise ValueError(f"asks must be a non-empty subset of ('value', 'entity'), not {asks!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        doc = generate_document(rng, rng.randint(*n_facts))
        out.append(doc.question(rng.randrange(len(doc.facts)), rng.choice(asks)))
    return out


def vocabulary_text() -> list[str]:
    """Sentences covering every word the generator can emit (tokenizer training)."""
    lines = []
    for rel in RELATIONS:
        for v in rel.values:
            for e in NAMES[:2]:
                lines.append(f"{rel.fact.format(e=e, v=v)} Q: {rel.ask_value.format(e=e)} A: {v}")
                lines.append(f"{rel.fact.format(e=e, v=v)} Q: {rel.ask_entity.format(v=v)} A: {e}")
    lines.extend(f"{e} lives in {CITIES[0]}." for e in NAMES)
    return lines


# --------------------------------------------------------------------------- SQuAD

def _squad_qtype(question: str) -> str:
    words = question.strip().lower().split()
    for w in words[:3]:
        w = w.strip("?,.'\"")
        if w in ("what", "who", "when", "where", "which", "how", "why", "whom", "whose"):
            return w
    return "other"


def load_squad(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """SQuAD v1/v2 JSON as ``QAExample``s (the first answer of each question).

    Evidence: the sentence(s) of the context overlapping the answer span
    ``[answer_start, answer_start + len(text))``. Unanswerable questions
    (v2 ``is_impossible``) and answers whose text is not at ``answer_start``
    are skipped. ``qtype`` is the question's wh-word.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out: list[QAExample] = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            context = para["context"]
            spans = sentence_spans(context)
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa.get("answers"):
                    continue
                ans = qa["answers"][0]
                a_start = int(ans["answer_start"])
                a_end = a_start + len(ans["text"])
                if context[a_start:a_end] != ans["text"]:
                    continue
                evidence = tuple((s, e) for s, e in spans if s < a_end and a_start < e)
                out.append(QAExample(context, qa["question"].strip(), ans["text"], evidence,
                                     _squad_qtype(qa["question"])))
                if limit is not None and len(out) >= limit:
                    return out
    return out
