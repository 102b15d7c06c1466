"""Tokenization with offsets and segmentation into units (ATMAN_SPEC §4)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atman_vllm.core import (
    AUTO_MAX_UNITS,
    ExplainOptions,
    Granularity,
    InvalidRequestError,
    TargetGranularity,
    Unit,
    encode_input,
    segment_prompt,
    target_units,
)
from fake_tokenizer import FakeTokenizer, HFStyleTokenizer

PARTITIONING = [
    ExplainOptions(granularity="token"),
    ExplainOptions(granularity="word"),
    ExplainOptions(granularity="sentence"),
    ExplainOptions(granularity="paragraph"),
    ExplainOptions(granularity="custom", delimiter=";"),
    ExplainOptions(granularity="custom", delimiter=" and "),
    ExplainOptions(granularity="auto"),
]

# Pieces rather than characters, so words, " and " delimiters and blank lines come up often.
texts = st.lists(st.sampled_from(list("ab xyz.!?;\n\t'é,") + [" and ", "\n\n", ". "]), min_size=1, max_size=40).map("".join)


def units_of(text, options, tokenizer=None, prompt_start=1):
    tok = tokenizer or FakeTokenizer()
    _, offsets = tok.encode(text)
    return segment_prompt(text, offsets, prompt_start, options.validated()), len(offsets)


@settings(max_examples=150, deadline=None)
@given(text=texts, hf_style=st.booleans())
def test_units_partition_the_prompt_tokens_and_spans_are_ordered_and_inside(text, hf_style):
    tok = HFStyleTokenizer() if hf_style else FakeTokenizer()
    for options in PARTITIONING:
        (units, resolved), n_tokens = units_of(text, options, tok)
        assert resolved is not Granularity.AUTO
        positions = [p for u in units for p in u.positions]
        assert sorted(positions) == list(range(1, 1 + n_tokens)), (options, units)  # each token exactly once
        end = 0
        for u in units:
            assert 0 <= u.start and u.length > 0 and u.start + u.length <= len(text)
            assert u.start >= end  # in text order, no overlap
            end = u.start + u.length
            assert u.text == text[u.start:u.start + u.length]
            assert u.region == "prompt"
        if options.granularity == "auto" and resolved is not Granularity.PARAGRAPH:
            assert len(units) <= AUTO_MAX_UNITS


def texts_of(units):
    return [u.text for u in units]


def test_word_units_and_whitespace_tokens_join_the_next_word():
    text = "Ben likes  to eat"
    (units, _), _ = units_of(text, ExplainOptions(granularity="word"))
    assert texts_of(units) == ["Ben", "likes", "to", "eat"]
    # FakeTokenizer: "Ben" " likes" " " " to" " eat"; the lone space token joins " to"'s unit.
    assert [u.positions for u in units] == [(1,), (2,), (3, 4), (5,)]
    assert (units[1].start, units[1].length) == (4, 5)


def test_trailing_whitespace_token_joins_the_previous_unit():
    (units, _), n = units_of("Ben eats   ", ExplainOptions(granularity="word"))
    assert texts_of(units) == ["Ben", "eats"] and units[-1].positions == (2, 3) and n == 3


def test_sentence_and_paragraph_units():
    text = 'One two. "Three!" Four? Five\n\nSix. Seven'
    (units, _), _ = units_of(text, ExplainOptions(granularity="sentence"))
    assert texts_of(units) == ["One two.", '"Three!"', "Four?", "Five", "Six.", "Seven"]
    (units, _), _ = units_of(text, ExplainOptions(granularity="paragraph"))
    assert texts_of(units) == ['One two. "Three!" Four? Five', "Six. Seven"]
    (units, _), _ = units_of("3.14 is pi. Yes", ExplainOptions(granularity="sentence"))
    assert texts_of(units) == ["3.14 is pi.", "Yes"]  # a dot not followed by space ends nothing


def test_custom_delimiter_units():
    (units, _), _ = units_of("a b; c d;; e", ExplainOptions(granularity="custom", delimiter=";"))
    assert texts_of(units) == ["a b", "c d", "e"]


def test_token_units_merge_tokens_that_share_characters():
    (units, _), n = units_of("aé  b", ExplainOptions(granularity="token"), HFStyleTokenizer())
    # tokens: a, é#1, é#2 (both (1, 2)), "  " zero-width, b
    assert texts_of(units) == ["a", "é", "b"]
    assert [u.positions for u in units] == [(1,), (2, 3), (4, 5)] and n == 5


def test_whitespace_only_prompt_is_one_unit():
    (units, _), n = units_of("   ", ExplainOptions(granularity="word"))
    assert len(units) == 1 and units[0].positions == tuple(range(1, n + 1)) and units[0].text == "   "


def test_auto_picks_the_finest_granularity_with_at_most_30_units():
    short = "Ben likes to eat burgers and"
    (units, g), _ = units_of(short, ExplainOptions())
    assert g is Granularity.TOKEN and len(units) == 6
    many_words = " ".join(["w"] * 20) + ". " + " ".join(["v"] * 20) + "."
    (units, g), _ = units_of(many_words, ExplainOptions())
    assert g is Granularity.SENTENCE and len(units) == 2  # 42 tokens, 40 words -> sentences
    huge = "\n\n".join(". ".join(["x y"] * 40) for _ in range(40))
    (units, g), _ = units_of(huge, ExplainOptions())
    assert g is Granularity.PARAGRAPH and len(units) == 40  # nothing fits: paragraphs anyway


def test_explicit_spans_are_units_in_text_order_and_other_tokens_belong_to_none():
    text = "Ben likes to eat burgers"
    (units, g), _ = units_of(text, ExplainOptions(spans=((17, 7), (0, 3))))
    assert g is Granularity.SPANS
    assert [(u.start, u.length, u.text) for u in units] == [(0, 3, "Ben"), (17, 7, "burgers")]
    assert [u.positions for u in units] == [(1,), (5,)]


@pytest.mark.parametrize("spans, message", [
    (((0, 0),), "empty"),
    (((-1, 2),), "outside"),
    (((20, 10),), "outside"),
    (((0, 5), (3, 4)), "overlap"),
    (((0, 1), (1, 2)), "covers no token"),  # "Ben": 1 char vs 2 chars of the same token
])
def test_bad_spans_are_rejected_naming_spans(spans, message):
    with pytest.raises(InvalidRequestError) as e:
        units_of("Ben likes to eat burgers", ExplainOptions(spans=spans))
    assert e.value.field == "spans" and message in e.value.message


def test_target_units_are_every_target_token_but_the_last_and_only_for_token_granularity():
    tok = FakeTokenizer()
    enc = encode_input(tok, "Ben likes", " fries and ketchup")
    units = target_units(" fries and ketchup", enc.target_offsets, enc.target_start, TargetGranularity.TOKEN)
    assert [(u.text, u.positions, u.region) for u in units] == [
        (" fries", (3,), "target"), (" and", (4,), "target")]
    assert target_units(" fries and ketchup", enc.target_offsets, enc.target_start, TargetGranularity.COMPLETE) == []
    one = encode_input(tok, "Ben likes", " fries")
    assert target_units(" fries", one.target_offsets, one.target_start, TargetGranularity.TOKEN) == []


def test_encode_input_layout_with_and_without_bos():
    enc = encode_input(FakeTokenizer(), "Ben likes", " fries")
    assert (enc.prompt_start, enc.target_start, enc.num_targets, len(enc.token_ids)) == (1, 3, 1, 4)
    assert enc.token_ids[0] == 0 and enc.prompt_offsets == ((0, 3), (3, 9)) and enc.target_offsets == ((0, 6),)
    enc = encode_input(FakeTokenizer(bos=False), "Ben likes", " fries")
    assert (enc.prompt_start, enc.target_start, len(enc.token_ids)) == (0, 2, 3)


@pytest.mark.parametrize("prompt, target, field", [
    ("", "x", "prompt"), ("x", "", "target"), (None, "x", "prompt"), ("x", 3, "target"),
])
def test_encode_input_rejects_bad_text_naming_the_field(prompt, target, field):
    with pytest.raises(InvalidRequestError) as e:
        encode_input(FakeTokenizer(), prompt, target)
    assert e.value.field == field


def test_text_without_tokens_is_rejected():
    class SilentTokenizer(FakeTokenizer):
        def encode(self, text):
            return [], []

    with pytest.raises(InvalidRequestError, match="no tokens") as e:
        encode_input(SilentTokenizer(), "x", "y")
    assert e.value.field == "prompt"


def test_a_unit_needs_tokens():
    with pytest.raises(ValueError):
        Unit(0, 1, "a", ())
    with pytest.raises(ValueError):
        Unit(0, 1, "a", (3, 2))
