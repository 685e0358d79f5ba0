"""Self backend on a tiny random Llama: one batched forward equals independent per-window computations."""

import math

import pytest
import torch
from repair_helpers import CallCounter, contract_dict, tiny_llama

from halo.repair import SelfRepairer, validate_contract_dicts

VOCAB = 211


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, seed=3)


def _dicts(seed, k=7, dim_fraction=0.0, lo=2, hi=60):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        w = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (w,), generator=g)
        bright = torch.where(torch.rand(w, generator=g) < dim_fraction, 20.0, 220.0)
        j = int(torch.randint(1, w, (1,), generator=g))
        out.append(contract_dict(ids, j, 31 * i, brightness=bright))
    return out


def _independent_left(model, d, threshold, guidance):
    """Logits for the target from its left context, one window at a time, straight through the full model."""
    ids, j = d["window_token_ids"], d["masked_position_local"]
    bright = d["window_brightness_map"]
    dim = bright[:j] < threshold if guidance != "none" else torch.zeros(j, dtype=torch.bool)
    with torch.no_grad():
        if guidance != "soft":
            out = model(input_ids=ids[None, :j], attention_mask=(~dim).long()[None])
        else:
            scale = torch.where(dim, bright[:j] / 255, 1.0)
            out = model(inputs_embeds=model.get_input_embeddings()(ids[None, :j]) * scale[None, :, None])
    return out.logits[0, -1]


@pytest.mark.parametrize("guidance,dim_fraction", [("hard", 0.0), ("hard", 0.4), ("soft", 0.4),
                                                     ("none", 0.4)])
def test_prediction_equals_independent_argmax(model, guidance, dim_fraction):
    rep = SelfRepairer(model, guidance=guidance, repair_threshold=64.0, min_margin=-math.inf)
    dicts = _dicts(seed=1, dim_fraction=dim_fraction)
    if dim_fraction:  # also a window whose whole left context is dim
        d = dicts[0]
        d["window_brightness_map"][: d["masked_position_local"]] = 5.0
    s = rep.suggest(validate_contract_dicts(dicts))
    assert torch.isfinite(s.margin).all()
    for n, d in enumerate(dicts):
        logits = _independent_left(model, d, 64.0, guidance)
        assert int(s.token_ids[n]) == int(logits.argmax()), n
        orig = d["original_token_id_at_mask"]
        assert float(s.margin[n]) == pytest.approx(float(logits.max() - logits[orig]), abs=1e-4)


def test_one_forward_and_head_on_target_rows_only(model):
    rep = SelfRepairer(model, min_margin=-math.inf)
    dicts = _dicts(seed=2)
    with CallCounter(model.model, model.model.layers[0], model.lm_head, model) as c:
        rep.repair(dicts)
    assert c.calls == [1, 1, 1, 0]
    (args, _), = c.inputs[2]
    assert tuple(args[0].shape) == (len(dicts), model.config.hidden_size)


def test_target_without_left_context_gets_no_suggestion(model):
    rep = SelfRepairer(model, min_margin=-math.inf)
    d = contract_dict([5, 6, 7], 0, 0)
    assert rep.suggest(validate_contract_dicts([d])).token_ids.tolist() == [-1]
    assert rep.repair([d]) == []


def _independent_rerank(model, rep, d, c, span):
    """Scores every candidate with its own forward: log p(x | left) + log p(right context | left, x)."""
    ids, j = d["window_token_ids"].clone(), d["masked_position_local"]
    cands, valid = rep.candidates(torch.tensor([d["original_token_id_at_mask"]]), c)
    cands = cands[0]
    assert valid.all()  # no tokenizer: no kind restriction
    end = min(len(ids), j + span + 1)
    scores = []
    for x in cands.tolist():
        seq = ids[:end].clone()
        seq[j] = x
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)
        scores.append(sum(float(logp[t - 1, seq[t]]) for t in range(j, end)))
    best = max(range(len(scores)), key=scores.__getitem__)
    return int(cands[best]), scores[best] - scores[0], cands


def test_rerank_is_one_forward_and_matches_independent_scoring(model):
    c, span = 4, 5
    rep = SelfRepairer(model, rerank_top=c, rerank_span=span, min_margin=-math.inf)
    dicts = _dicts(seed=4, k=6, lo=4, hi=30)
    with CallCounter(model.model, model.model.layers[0], model) as counter:
        s = rep.suggest(validate_contract_dicts(dicts))
    assert counter.calls == [1, 1, 0]
    (_, kwargs), = counter.inputs[0]
    assert kwargs["input_ids"].shape[0] == len(dicts) * c  # K * c sequences in the single forward
    for n, d in enumerate(dicts):
        best, margin, cands = _independent_rerank(model, rep, d, c, span)
        assert int(cands[0]) == d["original_token_id_at_mask"]
        assert len(set(cands.tolist())) == c
        assert int(s.token_ids[n]) == best
        assert float(s.margin[n]) == pytest.approx(margin, abs=1e-3)


def test_rerank_repair_contract(model):
    rep = SelfRepairer(model, rerank_top=3, min_margin=0.0)
    dicts = _dicts(seed=5, k=5, lo=4, hi=30)
    diffs = rep.repair(dicts)
    for pos, old, new in diffs:
        assert old != new and 0 <= new < VOCAB
    with pytest.raises(ValueError, match="rerank_top"):
        SelfRepairer(model, rerank_top=1)


@pytest.mark.parametrize("guidance", ["hard", "soft"])
def test_prepared_4d_mask_equals_the_decoders_own_mask(guidance):
    """SDPA-style models get a prepared 4D mask (graph-safe), others the 2D one: the same suggestions."""
    sdpa, eager = tiny_llama(VOCAB, seed=3), tiny_llama(VOCAB, seed=3)
    sdpa.set_attn_implementation("sdpa")
    eager.set_attn_implementation("eager")
    batch = validate_contract_dicts(_dicts(seed=4, dim_fraction=0.4))
    got = [SelfRepairer(m, guidance=guidance, min_margin=-math.inf).suggest(batch) for m in (sdpa, eager)]
    assert torch.equal(got[0].token_ids, got[1].token_ids)
    torch.testing.assert_close(got[0].margin, got[1].margin, rtol=1e-4, atol=1e-4)
