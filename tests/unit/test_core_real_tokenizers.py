"""Real tokenizers at the prompt/target boundary, and chat prompts (issue 12, items 3 and 4).

SmolLM2-135M-Instruct's byte-level BPE (from the prepared model's directory) and a SentencePiece
BPE tokenizer trained here on a few sentences: the scored ids are exactly the tokenizer's ids for
prompt + target; a token across the boundary is scored as the first target token and reported;
target ids given as ids are scored as given, a cut-off UTF-8 sequence included; chat units come
only from the messages' contents. No engine: planning is pure.
"""

from __future__ import annotations

import pytest

from atman_vllm.core import (
    ChatMessage,
    ExplainOptions,
    ExplainRequest,
    HFTokenizer,
    InvalidRequestError,
    check_messages,
    encode_input,
    encode_with_target_ids,
    locate_contents,
    plan_explanation,
)

PROMPT = "Ben likes to eat burgers and"


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from atman_vllm.models.registry import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def sentencepiece():
    """A SentencePiece BPE ("▁" word starts, a dummy prefix) trained on a few sentences, as a fast tokenizer."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = ["Ben likes to eat burgers and fries.", "Mira works as a pilot in Lisbon and flies planes every day.",
              "Otto bakes bread in Porto and sells it at the market."] * 20
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus, vocab_size=120, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _joint_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["smol", "sentencepiece"])
@pytest.mark.parametrize("prompt,target,aligned,prompt_chars", [
    (PROMPT, " fries", True, 0),          # the usual split: the target starts with its space
    (PROMPT + " ", "fries", False, 1),    # the prompt's trailing space belongs to " fries" / "▁fries"
    ("Ben likes to eat burg", "ers and fries", False, 5),  # inside a word: " burgers" / "▁burger" spans both
])
def test_scored_ids_are_the_tokenizers_ids_of_prompt_plus_target(request, name, prompt, target, aligned,
                                                                  prompt_chars):
    tok = request.getfixturevalue(name)
    enc = encode_input(HFTokenizer(tok), prompt, target)
    assert list(enc.token_ids[enc.prompt_start:]) == _joint_ids(tok, prompt + target)
    assert enc.boundary.aligned is aligned and enc.boundary.prompt_chars == prompt_chars
    if not aligned:
        assert repr(prompt[len(prompt) - prompt_chars:]) in enc.boundary.note
    # Target offsets index the target text; together they cover it from its start.
    assert enc.target_offsets[0][0] == 0 and enc.target_offsets[-1][1] == len(target)
    # The prompt tokens lie inside the prompt: the characters the first target token took are in no unit.
    assert all(e <= len(prompt) - prompt_chars for _, e in enc.prompt_offsets)


def test_sentencepiece_dummy_prefix_is_not_invented_at_the_boundary(sentencepiece):
    # Tokenized alone, "fries" gets SentencePiece's dummy prefix ("▁fries": a space the text does not
    # have); tokenized with the prompt, "andfries" is what the model sees.
    alone = _joint_ids(sentencepiece, "fries")
    enc = encode_input(HFTokenizer(sentencepiece), PROMPT, "fries")
    assert list(enc.token_ids[enc.target_start:]) != alone
    assert list(enc.token_ids[enc.prompt_start:]) == _joint_ids(sentencepiece, PROMPT + "fries")


def test_straddling_token_is_scored_and_reported(smol):
    plan = plan_explanation(ExplainRequest(PROMPT + " ", "fries", ExplainOptions(granularity="word")), HFTokenizer(smol))
    result = plan.finish([_ce(plan)] * len(plan.jobs), 0.0)
    assert [u.text for u in plan.units] == ["Ben", "likes", "to", "eat", "burgers", "and"]
    assert result.target_boundary.aligned is False and result.target_boundary.prompt_chars == 1
    assert result.to_dict()["target_boundary"]["aligned"] is False
    assert [t.text for t in result.target_tokens] == ["fries"]  # the token " fries", its target part


def test_prompt_merged_whole_into_the_target_is_refused(smol):
    with pytest.raises(InvalidRequestError) as e:
        encode_input(HFTokenizer(smol), "hel", "lo")
    assert e.value.field == "prompt" and "merges the whole prompt" in e.value.message


def test_target_ids_are_scored_as_given_even_a_cut_off_character(smol):
    tok = HFTokenizer(smol)
    ids = _joint_ids(smol, " 😀")  # two byte-level tokens for one character
    assert len(ids) == 2
    whole = encode_with_target_ids(tok, PROMPT, ids)
    assert whole.token_ids[whole.target_start:] == tuple(ids)
    # Tokenizing the text gives these ids: the tokenizer's own offsets are reported.
    assert whole.target == " 😀" and whole.target_offsets == encode_input(tok, PROMPT, " 😀").target_offsets
    cut = encode_with_target_ids(tok, PROMPT, ids[:1])  # generation stopped inside the character
    assert cut.token_ids[cut.target_start:] == tuple(ids[:1])  # still exactly the generated id
    assert cut.target.endswith("\ufffd")
    # The text is its decoding; spans from decoding it incrementally: a piece of a character has none.
    from atman_vllm.core import decoded_offsets

    assert decoded_offsets(tok, ids) == (" 😀", ((0, 1), (1, 2)))
    # Re-tokenizing the decoded text would have scored other ids: the reason ids travel as ids.
    assert _joint_ids(smol, cut.target) != ids[:1]


def _ce(plan):
    from atman_vllm.core import ForkResult

    return ForkResult(target_ce=[1.0] * plan.encoded.num_targets, computed_tokens=1, cached_tokens=0)


MESSAGES = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Ben likes to eat burgers and what?"}]


def _chat_request(tok, messages, target, **options):
    def render(msgs):
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    rendered, chat = locate_contents(check_messages(messages), render)
    return ExplainRequest(rendered, target, ExplainOptions(**options), chat=chat)


def test_chat_units_are_message_content_only(smol):
    request = _chat_request(smol, MESSAGES, "Fries", granularity="word")
    plan = plan_explanation(request, HFTokenizer(smol))
    # The rendered prompt's ids, without an added BOS (as vLLM tokenizes a chat), then the answer.
    assert list(plan.encoded.token_ids) == _joint_ids(smol, request.prompt + "Fries")
    assert plan.encoded.boundary.aligned  # the generation prompt ends with "\n"
    words = [(u.message, u.text) for u in plan.units]
    assert words == [(0, "You"), (0, "answer"), (0, "in"), (0, "one"), (0, "word."),
                     (1, "Ben"), (1, "likes"), (1, "to"), (1, "eat"), (1, "burgers"), (1, "and"), (1, "what?")]
    for u in plan.units:  # spans index the message's content
        assert MESSAGES[u.message]["content"][u.start:u.start + u.length] == u.text
    # No template token (<|im_start|>, roles, newlines, <|im_end|>) is in a unit.
    in_units = {p for u in plan.units for p in u.positions}
    template = [i for i in range(plan.encoded.target_start) if i not in in_units]
    assert {smol.decode([plan.encoded.token_ids[i]]) for i in template} >= {"<|im_start|>", "<|im_end|>", "user"}
    result = plan.finish([_ce(plan)] * len(plan.jobs), 0.0).to_dict()
    assert result["messages"] == MESSAGES
    assert {s["message"] for s in result["explanations"][0]["prompt_scores"]} == {0, 1}


def test_chat_default_system_prompt_of_the_template_is_never_a_unit(smol):
    # SmolLM2's template adds its own system prompt when none is given: template text, not a message.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    request = _chat_request(smol, messages, "Paris", granularity="token")
    assert "You are a helpful AI assistant named SmolLM" in request.prompt
    plan = plan_explanation(request, HFTokenizer(smol))
    assert {u.message for u in plan.units} == {0}
    assert "".join(smol.decode([plan.encoded.token_ids[p]]) for u in plan.units for p in u.positions) \
        == messages[0]["content"]


def test_chat_kappa_never_suppresses_template_tokens(smol):
    import numpy as np

    request = _chat_request(smol, MESSAGES, "Fries", granularity="word", kappa=0.0)  # kappa 0: all similar
    plan = plan_explanation(request, HFTokenizer(smol), lambda ids: np.ones((len(ids), 4)))
    content = {p for u in plan.units for p in u.positions}
    for job in plan.jobs[1:]:
        assert set(job.bias.positions) <= content | set(range(plan.encoded.target_start, plan.num_tokens))


@pytest.mark.parametrize("messages,needle", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message must be from the user"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content must be a string"),
    ([{"role": "user", "content": "hi", "name": "x"}], "unknown field 'name'"),
    ([{"role": "user", "content": " "}], "nothing to explain"),
    ("hi", "non-empty list"),
])
def test_bad_messages_name_the_field(messages, needle):
    with pytest.raises(InvalidRequestError) as e:
        check_messages(messages)
    assert e.value.field == "messages" and needle in e.value.message


def test_template_that_does_not_copy_contents_verbatim_is_refused():
    def render(msgs):  # upper-cases the content: spans could not be placed
        return "".join(f"{m['role']}: {m['content'].upper()}\n" for m in msgs)

    with pytest.raises(InvalidRequestError) as e:
        locate_contents((ChatMessage("user", "hi"),), render)
    assert e.value.field == "messages" and "verbatim" in e.value.message


def test_chat_spans_granularity_is_refused(smol):
    request = _chat_request(smol, MESSAGES, "Fries", granularity="spans", spans=((0, 3),))
    with pytest.raises(InvalidRequestError) as e:
        plan_explanation(request, HFTokenizer(smol))
    assert e.value.field == "spans"


def test_chat_result_views_highlight_each_message_content(smol):
    import io

    from rich.console import Console

    from atman_vllm.core import ForkResult
    from atman_vllm.view import notebook_html, render_explanation

    plan = plan_explanation(_chat_request(smol, MESSAGES, "Fries", granularity="word"), HFTokenizer(smol))
    # Suppressing "burgers" (the 10th unit) raises the answer's cross-entropy; nothing else matters.
    results = [ForkResult(target_ce=[2.0 if i == 10 else 1.0] * plan.encoded.num_targets, computed_tokens=1)
               for i in range(len(plan.jobs))]
    result = plan.finish(results, 0.0)
    buf = io.StringIO()
    render_explanation(result, Console(file=buf, width=120, color_system="truecolor", force_terminal=True))
    text = buf.getvalue()
    assert "\x1b[30;48;2;214;96;77mburgers" in text  # highlighted inside the user message's line
    assert "<|im_start|>" not in text and "message 1 17:7" in text
    page = notebook_html(result)
    assert "user: " in page and "system: " in page and "&lt;|im_start|&gt;" not in page
