"""Property: every applied diff keeps the target's word shape, for both backends and every host vocabulary.

Over 10,000 seeded random windows per backend (slices of tokenised documentation text, and windows of uniformly random ids
that reach byte, whitespace and special targets) go through `repair_batch` with the gate open
(`min_margin=-inf`), so every suggestion that differs from its target becomes a diff. For every diff the new
token must have the old token's shape (word start / continuation, word / symbol) read from the token spellings
(`repair_helpers.word_shape`, independent of `halo.repair.kinds`), and the window's text must keep its number of
words. Each case also checks that the same windows *would* break boundaries without the kind restriction, so
the property is not trivially true.
"""

import math
import random
from typing import NamedTuple

import pytest
import torch
from repair_helpers import contract_dict, tiny_llama, word_shape

from halo.repair import MaskedLMRepairer, SelfRepairer, validate_contract_dicts

WINDOWS = 3400  # per backend and host vocabulary: over 10,000 per backend with the three built-in vocabularies
RERANK_WINDOWS = 240
CHUNK = 200  # windows per repair call (keeps [K, V] logits small for 32k vocabularies)
RERANK_CHUNK = 40  # the re-ranking forward holds K * c sequences

IN_PROCESS_MLM = ("mlm_model", "mlm_tokenizer")
HOSTS = {  # host tokenizer fixture -> (piece style, (MLM fixture, MLM tokenizer fixture))
    "sp_host_tokenizer": ("sentencepiece", IN_PROCESS_MLM),
    "bl_host_tokenizer": ("byte_level", IN_PROCESS_MLM),
    "tiny_bl_tokenizer": ("byte_level", IN_PROCESS_MLM),
    "llama2_tokenizer": ("sentencepiece", ("bert_vocab_mlm", "bert_uncased_tokenizer")),
}


class Host(NamedTuple):
    tokenizer: object
    style: str
    mlm_fixtures: tuple  # (MLM fixture, MLM tokenizer fixture)


@pytest.fixture(scope="module", params=sorted(HOSTS))
def host(request) -> Host:
    """The host vocabulary under test; the real Llama-2 one skips when absent."""
    style, mlm_fixtures = HOSTS[request.param]
    return Host(request.getfixturevalue(request.param), style, mlm_fixtures)


@pytest.fixture(scope="module")
def mlm(request, host):
    """(MLM, its tokenizer) for the host: a tiny random DistilBERT over the real BERT vocabulary for Llama-2."""
    model, tokenizer = host.mlm_fixtures
    return request.getfixturevalue(model), request.getfixturevalue(tokenizer)


@pytest.fixture(scope="module")
def stream(host, corpus_lines) -> list[int]:
    return host.tokenizer("\n".join(corpus_lines[:1500]), add_special_tokens=False)["input_ids"]


def random_windows(stream: list[int], vocab_size: int, n: int, seed: int) -> list[dict]:
    """n contract dicts: 3 in 4 are slices of `stream`, 1 in 4 uniformly random ids; random target, some dim context."""
    rng = random.Random(seed)
    dicts = []
    for i in range(n):
        width = rng.randint(4, 40)
        if i % 4:
            start = rng.randrange(len(stream) - width)
            ids = stream[start: start + width]
        else:
            ids = [rng.randrange(vocab_size) for _ in range(width)]
        bright = [30.0 if rng.random() < 0.15 else 200.0 for _ in ids]
        dicts.append(contract_dict(ids, rng.randrange(1, width), 1000 * i, brightness=bright))
    return dicts


def repair_in_chunks(rep, dicts, chunk=CHUNK):
    """All diffs of `rep.repair` over `dicts`, `chunk` windows per call."""
    return [diff for at in range(0, len(dicts), chunk) for diff in rep.repair(dicts[at: at + chunk])]


def word_count(tokenizer, ids) -> int:
    return len(tokenizer.decode(ids).split())


def boundary_violations(tokenizer, style, dicts, diffs) -> list[str]:
    """Descriptions of the diffs that change the target's shape or the window's word count."""
    by_position = {d["global_cull_position"]: d for d in dicts}
    bad = []
    for position, old, new in diffs:
        d = by_position[position]
        ids = d["window_token_ids"].tolist()
        old_shape = word_shape(tokenizer, old, style)
        new_shape = word_shape(tokenizer, new, style)
        patched = list(ids)
        patched[d["masked_position_local"]] = new
        if old_shape is None or new_shape != old_shape or word_count(tokenizer, patched) != word_count(tokenizer, ids):
            bad.append(f"{tokenizer.convert_ids_to_tokens(old)!r} -> {tokenizer.convert_ids_to_tokens(new)!r}")
    return bad


def assert_boundary_true(tokenizer, style, dicts, diffs):
    bad = boundary_violations(tokenizer, style, dicts, diffs)
    assert not bad, f"{len(bad)} of {len(diffs)} diffs move a word boundary, e.g. {bad[:5]}"
    shapes = {word_shape(tokenizer, old, style) for _, old, _ in diffs}
    assert len(diffs) > len(dicts) // 3 and (True, True) in shapes and (False, True) in shapes, "too few diffs"


def test_masked_lm_diffs_keep_word_boundaries(host, mlm, stream):
    tokenizer, style = host.tokenizer, host.style
    model, mlm_tokenizer = mlm
    rep = MaskedLMRepairer(host_tokenizer=tokenizer, model=model, tokenizer=mlm_tokenizer, min_margin=-math.inf)
    dicts = random_windows(stream, len(tokenizer), WINDOWS, seed=1)
    diffs = repair_in_chunks(rep, dicts)
    assert_boundary_true(tokenizer, style, dicts, diffs)
    # Teeth: the bridged top-1 without the kind restriction breaks boundaries on (some of) these windows.
    dicts = dicts[:CHUNK]
    inputs = rep.build_inputs(validate_contract_dicts(dicts))
    top = rep.target_logits(inputs).masked_fill(~rep.bridge.bridged, float("-inf")).argmax(-1)
    unrestricted = [(dicts[k]["global_cull_position"], dicts[k]["original_token_id_at_mask"],
                     int(rep.bridge.mlm_to_host[m])) for k, m in zip(inputs.rows.tolist(), top.tolist())]
    assert boundary_violations(tokenizer, style, dicts, unrestricted)


@pytest.fixture(scope="module")
def host_llama(host):
    return tiny_llama(len(host.tokenizer), seed=7)


def test_self_diffs_keep_word_boundaries(host, stream, host_llama):
    tokenizer, style = host.tokenizer, host.style
    rep = SelfRepairer(host_llama, tokenizer, min_margin=-math.inf)
    dicts = random_windows(stream, len(tokenizer), WINDOWS, seed=2)
    diffs = repair_in_chunks(rep, dicts)
    assert_boundary_true(tokenizer, style, dicts, diffs)
    dicts = dicts[:CHUNK]
    unrestricted = SelfRepairer(host_llama, min_margin=-math.inf).repair(dicts)  # no tokenizer: no kinds
    assert boundary_violations(tokenizer, style, dicts, unrestricted)


def test_self_rerank_diffs_keep_word_boundaries(host, stream, host_llama):
    tokenizer, style = host.tokenizer, host.style
    rep = SelfRepairer(host_llama, tokenizer, rerank_top=4, rerank_span=2, min_margin=-math.inf)
    dicts = random_windows(stream, len(tokenizer), RERANK_WINDOWS, seed=3)
    diffs = repair_in_chunks(rep, dicts, RERANK_CHUNK)
    assert_boundary_true(tokenizer, style, dicts, diffs)
    dicts = dicts[:RERANK_CHUNK]
    unrestricted = SelfRepairer(host_llama, rerank_top=4, rerank_span=2, min_margin=-math.inf).repair(dicts)
    assert boundary_violations(tokenizer, style, dicts, unrestricted)


def test_no_candidate_of_the_kind_means_no_suggestion(sp_host_tokenizer):
    """A target whose kind has no candidate besides itself keeps its token (no -inf logit is ever picked)."""
    tok = sp_host_tokenizer
    model = tiny_llama(len(tok), seed=8)
    rep = SelfRepairer(model, tok, min_margin=-math.inf)
    space = tok.convert_tokens_to_ids("\u2581")  # whitespace: frozen, no candidates
    word = tok.convert_tokens_to_ids("\u2581the")
    batch = validate_contract_dicts([contract_dict([word, space, word], 1, 0), contract_dict([word, word], 1, 1)])
    s = rep.suggest(batch)
    assert int(s.token_ids[0]) == -1
    assert word_shape(tok, int(s.token_ids[1]), "sentencepiece") == (True, True)
    rerank = SelfRepairer(model, tok, rerank_top=3, min_margin=-math.inf)
    assert rerank.repair([contract_dict([word, space, word], 1, 0)]) == []
    assert torch.isfinite(rerank.suggest(batch).margin[1])
