"""Masked-LM backend on a tiny random DistilBERT with in-process tokenizers (SentencePiece and byte-level hosts).

The references restrict the MLM's candidates the way the backend must: bridged tokens of the target's shape
(word start or continuation, word or symbol), read from the token spellings (`repair_helpers.word_shape`).
"""

import math
import random

import pytest
import torch
from repair_helpers import CallCounter, contract_dict, mlm_word_shape, tiny_distilbert, word_shape
from transformers import pipeline

from halo.repair import MaskedLMRepairer, validate_contract_dicts
from halo.repair.bridge import NO_PIECE

SENTENCES = [
    "The object returns a list of values for the function.",
    "If the class defines a method, the instance calls it with the arguments given.",
    "A module is imported once; the name is bound in the local namespace of the statement.",
    "Exceptions raised in the try clause are handled by the except clause of the same statement.",
]


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level"])
def host(request, sp_host_tokenizer, bl_host_tokenizer):
    return sp_host_tokenizer if request.param == "sentencepiece" else bl_host_tokenizer


@pytest.fixture(scope="module")
def fill_mask(mlm_model, mlm_tokenizer):
    return pipeline("fill-mask", model=mlm_model, tokenizer=mlm_tokenizer, device="cpu")


def _style(host) -> str:
    return "sentencepiece" if "\u2581the" in host.get_vocab() else "byte_level"


def _allowed(rep, host, mlm_tokenizer, original_id) -> torch.Tensor:
    """bool [V_mlm]: bridged MLM tokens of the same shape as the host token `original_id` (independent oracle)."""
    shape = word_shape(host, original_id, _style(host))
    shapes = [mlm_word_shape(mlm_tokenizer, m) for m in range(len(mlm_tokenizer))]
    return rep.bridge.bridged & torch.tensor([s == shape for s in shapes])


def _independent_text(host, ids, j):
    """The window text with the target replaced by [MASK], built with the host's own decoder."""
    return host.decode(ids[:j]) + " [MASK] " + host.decode(ids[j + 1:])


def _pipeline_best_allowed(fill_mask, text, allowed, mask_ordinal=0):
    vocab = fill_mask.tokenizer.vocab_size if hasattr(fill_mask.tokenizer, "vocab_size") else len(fill_mask.tokenizer)
    out = fill_mask(text, top_k=len(fill_mask.tokenizer))
    if out and isinstance(out[0], list):  # several masks: one list per mask
        out = out[mask_ordinal]
    assert len(out) == len(fill_mask.tokenizer) >= vocab
    for cand in out:  # sorted by score, best first
        if bool(allowed[cand["token"]]):
            return cand["token"]
    return -1


def test_top1_equals_fill_mask_pipeline(host, mlm_model, mlm_tokenizer, fill_mask):
    rep = MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, min_margin=-math.inf)
    rng = random.Random(0)
    dicts, expected_texts = [], []
    for i, sentence in enumerate(SENTENCES * 2):
        ids = host(sentence, add_special_tokens=False)["input_ids"]
        candidates = [j for j in range(len(ids)) if rep.host_pieces.kinds[ids[j]] != NO_PIECE]
        j = rng.choice(candidates)
        dicts.append(contract_dict(ids, j, 50 + i))
        expected_texts.append(_independent_text(host, ids, j))
    batch = validate_contract_dicts(dicts)
    inputs = rep.build_inputs(batch)
    # The MLM sees exactly the tokens of the independently built text (alignment is exact).
    for n, text in enumerate(expected_texts):
        ref = mlm_tokenizer(text)["input_ids"]
        assert inputs.input_ids[n, : len(ref)].tolist() == ref
        assert int(inputs.input_ids[n, inputs.target_rows[n]]) == mlm_tokenizer.mask_token_id
    suggestions, mlm_top = rep.predict(batch)
    for n, text in enumerate(expected_texts):
        orig = dicts[n]["original_token_id_at_mask"]
        best = _pipeline_best_allowed(fill_mask, text, _allowed(rep, host, mlm_tokenizer, orig))
        assert int(mlm_top[n]) == best
        host_best = int(rep.bridge.mlm_to_host[best])
        if int(rep.bridge.host_to_mlm[orig]) == best:
            host_best = orig  # the suggestion spells the current token
        assert int(suggestions.token_ids[n]) == host_best
    diffs = rep.repair(dicts)
    assert diffs == [(d["global_cull_position"], d["original_token_id_at_mask"], int(suggestions.token_ids[n]))
                     for n, d in enumerate(dicts) if int(suggestions.token_ids[n]) != d["original_token_id_at_mask"]]
    assert all(word_shape(host, new, _style(host)) == word_shape(host, old, _style(host)) for _, old, new in diffs)


def test_hard_guidance_masks_dim_context(host, mlm_model, mlm_tokenizer, fill_mask):
    rep = MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, repair_threshold=100.0,
                           min_margin=-math.inf)
    ids = host(SENTENCES[1], add_special_tokens=False)["input_ids"]
    j = next(j for j in range(4, len(ids)) if rep.host_pieces.kinds[ids[j]] != NO_PIECE)
    dim = [i for i in (1, 2, j + 2) if rep.host_pieces.kinds[ids[i]] != NO_PIECE]
    bright = [200.0] * len(ids)
    for i in dim:
        bright[i] = 30.0
    d = contract_dict(ids, j, 9, brightness=bright)
    batch = validate_contract_dicts([d])
    text = rep.window_texts(batch)[0][0]
    assert text.count("[MASK]") == len(dim) + 1
    ordinal = sum(1 for i in dim if i < j)
    _, top = rep.predict(batch)
    allowed = _allowed(rep, host, mlm_tokenizer, ids[j])
    assert int(top[0]) == _pipeline_best_allowed(fill_mask, text, allowed, ordinal)


def test_no_guidance_reads_dim_context_as_it_is(host, mlm_model, mlm_tokenizer):
    rep = MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, guidance="none",
                           repair_threshold=100.0, min_margin=-math.inf)
    ids = host(SENTENCES[1], add_special_tokens=False)["input_ids"]
    j = next(j for j in range(4, len(ids)) if rep.host_pieces.kinds[ids[j]] != NO_PIECE)
    bright = [30.0] * len(ids)  # all context dim: only the target is masked all the same
    batch = validate_contract_dicts([contract_dict(ids, j, 9, brightness=bright)])
    inputs = rep.build_inputs(batch)
    assert inputs.texts[0].count("[MASK]") == 1 and inputs.scale is None


def test_soft_guidance_scales_embeddings(host, mlm_model, mlm_tokenizer):
    rep = MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, guidance="soft",
                           repair_threshold=100.0, min_margin=-math.inf)
    ids = host(SENTENCES[0], add_special_tokens=False)["input_ids"]
    j = next(j for j in range(3, len(ids)) if rep.host_pieces.kinds[ids[j]] != NO_PIECE)
    bright = [200.0] * len(ids)
    bright[1] = 10.0
    bright[j + 1] = 51.0
    batch = validate_contract_dicts([contract_dict(ids, j, 9, brightness=bright)])
    inputs = rep.build_inputs(batch)
    assert "[MASK]" in inputs.texts[0] and inputs.texts[0].count("[MASK]") == 1
    scale = inputs.scale[0]
    # Every MLM token inherits its host token's scale; the dim tokens' pieces are scaled, the rest are not.
    assert torch.allclose(scale.unique(), torch.tensor([10.0 / 255, 51.0 / 255, 1.0]))
    # Independent forward of the full model with the scaled embeddings.
    emb = mlm_model.get_input_embeddings()(inputs.input_ids) * scale[None, :, None]
    with torch.no_grad():
        logits = mlm_model(inputs_embeds=emb, attention_mask=inputs.attention_mask).logits[0, inputs.target_rows[0]]
    expected = logits.masked_fill(~_allowed(rep, host, mlm_tokenizer, ids[j]), float("-inf")).argmax()
    assert int(rep.predict(batch)[1][0]) == int(expected)


def test_one_forward_and_head_only_on_target_rows(host, mlm_model, mlm_tokenizer):
    rep = MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, min_margin=-math.inf)
    dicts = []
    for i, s in enumerate(SENTENCES):
        ids = host(s, add_special_tokens=False)["input_ids"]
        dicts.append(contract_dict(ids, 2, i))
    with CallCounter(mlm_model.distilbert, mlm_model.vocab_projector, mlm_model.vocab_transform) as c:
        rep.repair(dicts)
    assert c.calls == [1, 1, 1]
    (args, _), = c.inputs[1]
    assert tuple(args[0].shape) == (len(dicts), mlm_model.config.dim)  # K rows only, never [K, L, H]


def test_long_windows_are_trimmed_around_the_target(host, mlm_tokenizer):
    small = tiny_distilbert(len(mlm_tokenizer), seed=1, max_positions=64)
    rep = MaskedLMRepairer(host_tokenizer=host, model=small, tokenizer=mlm_tokenizer, min_margin=-math.inf)
    ids = host(" ".join(SENTENCES * 12), add_special_tokens=False)["input_ids"][:511]
    # word starts near each end and the middle (words always have bridged candidates of their kind)
    targets = [next(j for j in range(at, 511) if word_shape(host, ids[j], _style(host)) == (True, True))
               for at in (5, 250, 500)]
    batch = validate_contract_dicts([contract_dict(ids, j, j) for j in targets])
    inputs = rep.build_inputs(batch)
    assert inputs.input_ids.shape[1] == 64
    for n in range(len(targets)):
        row = inputs.input_ids[n]
        assert int(row[0]) == mlm_tokenizer.cls_token_id and int(row[-1]) == mlm_tokenizer.sep_token_id
        assert int(row[inputs.target_rows[n]]) == mlm_tokenizer.mask_token_id
    assert (rep.suggest(batch).token_ids >= 0).all()


def test_gate_and_unspellable_targets(host, mlm_model, mlm_tokenizer):
    ids = host(SENTENCES[2], add_special_tokens=False)["input_ids"]
    strict = MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, min_margin=1e30)
    diffs = strict.repair([contract_dict(ids, j, j) for j in range(len(ids))])
    # Only a current token the MLM cannot spell (no score: margin +inf) gets past an extreme gate.
    assert all(int(strict.bridge.host_to_mlm[old]) == -1 for _, old, _ in diffs)
    assert len(diffs) < len(ids)
    loose = MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, min_margin=-math.inf)
    eos = host.eos_token_id
    d = contract_dict(ids + [eos], len(ids), 77)  # a special token spells nothing: no suggestion
    assert int(loose.suggest(validate_contract_dicts([d])).token_ids[0]) == -1
    assert loose.repair([d]) == []


def test_bad_arguments(host, mlm_model, mlm_tokenizer):
    with pytest.raises(TypeError, match="host tokenizer"):
        MaskedLMRepairer(model=mlm_model, tokenizer=mlm_tokenizer)
    with pytest.raises(ValueError, match="guidance"):
        MaskedLMRepairer(host_tokenizer=host, model=mlm_model, tokenizer=mlm_tokenizer, guidance="loud")
