"""Oracle: the masked-LM backend agrees with transformers' `pipeline("fill-mask")` on whole-word targets.

The pipeline's candidates are restricted the way the backend's must be, built here from the vocabularies'
spellings alone: MLM whole words (no `##`, at least one letter or digit, not special) that the host vocabulary
spells as a word start (`▁word`, `Ġword`); `targets=` hands that list to the pipeline. Windows are 48 tokens of
documentation text whose target is a whole lower-case word (a word-start piece followed by another word start
or a symbol). Agreement is required on every window, for the in-process SentencePiece / byte-level hosts and,
when present, the real Llama-2 host with a tiny random DistilBERT over the real BERT uncased vocabulary.
"""

import functools
import math
import random

import pytest
from repair_helpers import contract_dict
from transformers import pipeline
from transformers.convert_slow_tokenizer import bytes_to_unicode

from halo.repair import MaskedLMRepairer, validate_contract_dicts

WINDOW = 48
N_WINDOWS = 24

CASES = {  # name -> (host tokenizer fixture, style, MLM tokenizer fixture, MLM fixture)
    "sentencepiece": ("sp_host_tokenizer", "sentencepiece", "mlm_tokenizer", "mlm_model"),
    "byte_level": ("bl_host_tokenizer", "byte_level", "mlm_tokenizer", "mlm_model"),
    "llama2+bert": ("llama2_tokenizer", "sentencepiece", "bert_uncased_tokenizer", "bert_vocab_mlm"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    host, style, mlm_tokenizer, mlm = CASES[request.param]
    return (request.getfixturevalue(host), style, request.getfixturevalue(mlm_tokenizer),
            request.getfixturevalue(mlm))


@functools.lru_cache(maxsize=None)
def _byte_chars() -> dict[int, str]:
    return bytes_to_unicode()


def host_word_start(style: str, word: str) -> str:
    """The host vocabulary's spelling of `word` as a word-start piece."""
    if style == "sentencepiece":
        return "\u2581" + word
    return "\u0120" + "".join(_byte_chars()[b] for b in word.encode())


def word_start_body(style: str, piece: str) -> str | None:
    """The word a host word-start piece spells (None for any other piece)."""
    marker = "\u2581" if style == "sentencepiece" else "\u0120"
    if not piece.startswith(marker):
        return None
    if style == "sentencepiece":
        return piece[1:]
    chars = {c: b for b, c in _byte_chars().items()}
    try:
        return bytes(chars[c] for c in piece[1:]).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def whole_word_targets(host, style, mlm_tokenizer) -> list[str]:
    """MLM whole words the host spells as word starts: the candidates of a whole-word target."""
    host_vocab = host.get_vocab()
    special = set(mlm_tokenizer.all_special_tokens)
    return [tok for tok in mlm_tokenizer.get_vocab()
            if tok not in special and not tok.startswith("##") and any(c.isalnum() for c in tok)
            and host_word_start(style, tok) in host_vocab]


def whole_lower_case_word_windows(host, style, corpus_lines, n, seed) -> list[tuple[list[int], int]]:
    """n (window ids, target index) pairs: the target spells a lower-case word and the next piece starts anew."""
    ids = host("\n".join(corpus_lines[:800]), add_special_tokens=False)["input_ids"]
    pieces = host.convert_ids_to_tokens(ids)
    marker = "\u2581" if style == "sentencepiece" else "\u0120"
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        start = rng.randrange(len(ids) - WINDOW)
        j = rng.randrange(1, WINDOW - 1)
        word = word_start_body(style, pieces[start + j])
        if word and word.isalpha() and word.islower() and pieces[start + j + 1].startswith(marker):
            out.append((ids[start: start + WINDOW], j))
    return out


def test_top1_agrees_with_fill_mask_pipeline_on_whole_words(case, corpus_lines):
    host, style, mlm_tokenizer, mlm = case
    rep = MaskedLMRepairer(host_tokenizer=host, model=mlm, tokenizer=mlm_tokenizer, min_margin=-math.inf)
    fill_mask = pipeline("fill-mask", model=mlm, tokenizer=mlm_tokenizer, device="cpu")
    targets = whole_word_targets(host, style, mlm_tokenizer)
    windows = whole_lower_case_word_windows(host, style, corpus_lines, N_WINDOWS, seed=13)
    dicts = [contract_dict(ids, j, 100 * n) for n, (ids, j) in enumerate(windows)]
    batch = validate_contract_dicts(dicts)
    inputs = rep.build_inputs(batch)
    suggestions, mlm_top = rep.predict(batch)
    agree = 0
    for n, (ids, j) in enumerate(windows):
        text = host.decode(ids[:j]) + " " + mlm_tokenizer.mask_token + " " + host.decode(ids[j + 1:])
        ref = mlm_tokenizer(text)["input_ids"]
        assert inputs.input_ids[n, : len(ref)].tolist() == ref  # the MLM sees exactly this text
        best, = fill_mask(text, targets=targets, top_k=1)
        current = word_start_body(style, host.convert_ids_to_tokens(ids[j])).lower()
        expected_host = ids[j] if best["token_str"] == current else host.convert_tokens_to_ids(
            host_word_start(style, best["token_str"]))
        agree += int(mlm_top[n]) == best["token"] and int(suggestions.token_ids[n]) == expected_host
    assert agree == len(windows)
