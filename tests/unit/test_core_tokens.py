"""The Hugging Face tokenizer adapter, and the core's import boundary."""

import subprocess
import sys

from atman_vllm.core import HFTokenizer, encode_input


class OffsetsTokenizer:
    """Duck-typed like a PreTrainedTokenizerFast: whitespace-split words, optional BOS prepend."""

    def __init__(self, bos_token_id, prepends_bos):
        self.bos_token_id = bos_token_id
        self.prepends_bos = prepends_bos
        self.words: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        import re

        spans = [m.span() for m in re.finditer(r"\S+", text)]
        ids = [self.words.setdefault(text[s:e], 10 + len(self.words)) for s, e in spans]
        if add_special_tokens and self.prepends_bos:
            ids, spans = [self.bos_token_id] + ids, [(0, 0)] + spans
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out

    def decode(self, ids):
        inverse = {v: k for k, v in self.words.items()}
        return " ".join(inverse[i] for i in ids)


def test_bos_is_prepended_exactly_when_the_tokenizer_does_it_itself():
    llama_like = HFTokenizer(OffsetsTokenizer(bos_token_id=1, prepends_bos=True))
    gpt2_like = HFTokenizer(OffsetsTokenizer(bos_token_id=5, prepends_bos=False))
    no_bos = HFTokenizer(OffsetsTokenizer(bos_token_id=None, prepends_bos=False))
    forced = HFTokenizer(OffsetsTokenizer(bos_token_id=5, prepends_bos=False), add_bos=True)
    assert (llama_like.bos_token_id, gpt2_like.bos_token_id, no_bos.bos_token_id, forced.bos_token_id) == (1, None, None, 5)
    enc = encode_input(llama_like, "Ben likes", " fries")
    assert enc.token_ids[0] == 1 and enc.prompt_start == 1 and enc.target_start == 3
    assert enc.prompt_offsets == ((0, 3), (4, 9)) and enc.target_offsets == ((1, 6),)
    assert llama_like.decode(enc.token_ids[1:]) == "Ben likes fries"
    assert encode_input(gpt2_like, "Ben likes", " fries").prompt_start == 0


def test_core_imports_no_model_runtime():
    code = ("import sys, atman_vllm.core, atman_vllm.cli; "
            "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
