"""CUDA-graph replay of the MLM forward: eager fallback on CPU, bucketed replay equal to eager on CUDA."""

import pytest
import torch
from repair_helpers import tiny_distilbert

from halo.repair import GraphedRepairForward, masked_lm_head

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _inputs(b, length, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    attn = torch.ones(b, length, dtype=torch.int64)
    for i in range(b):  # ragged rows
        attn[i, length - i:] = 0
    rows = torch.randint(0, length - b, (b,), generator=g)
    scale = torch.rand(b, length, generator=g)
    return ids.to(device), attn.to(device), rows.to(device), scale.to(device)


def test_cpu_falls_back_to_eager():
    model = tiny_distilbert(300)
    fwd = GraphedRepairForward(model.base_model, masked_lm_head(model), embeddings=model.get_input_embeddings())
    ids, attn, rows, scale = _inputs(3, 40, 300, "cpu")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn).logits[torch.arange(3), rows]
        assert torch.allclose(fwd(ids, attn, rows), full, atol=1e-5)
        emb = model.get_input_embeddings()(ids) * scale[..., None]
        full_soft = model(inputs_embeds=emb, attention_mask=attn).logits[torch.arange(3), rows]
        assert torch.allclose(fwd(ids, attn, rows, scale), full_soft, atol=1e-5)
    assert fwd.captured_shapes == []


@cuda
@pytest.mark.cuda
def test_replay_equals_eager_on_cuda():
    model = tiny_distilbert(300).cuda()
    fwd = GraphedRepairForward(model.base_model, masked_lm_head(model), embeddings=model.get_input_embeddings(),
                               batch_buckets=(2, 4), length_buckets=(32, 64))
    for b, length, seed in ((3, 40, 0), (2, 17, 1), (4, 64, 2), (3, 50, 3)):
        ids, attn, rows, scale = _inputs(b, length, 300, "cuda", seed)
        with torch.no_grad():
            eager = fwd.eager(ids, attn, rows)
            eager_soft = fwd.eager(ids, attn, rows, scale)
        torch.testing.assert_close(fwd(ids, attn, rows), eager, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fwd(ids, attn, rows, scale), eager_soft, atol=1e-4, rtol=1e-4)
    assert (4, 64, False) in fwd.captured_shapes and (2, 32, False) in fwd.captured_shapes
    # Beyond the largest bucket: eager.
    ids, attn, rows, _ = _inputs(5, 70, 300, "cuda")
    with torch.no_grad():
        torch.testing.assert_close(fwd(ids, attn, rows), fwd.eager(ids, attn, rows))


@cuda
@pytest.mark.cuda
def test_masked_lm_repairer_with_graphs_matches_eager(sp_host_tokenizer, mlm_tokenizer):
    from repair_helpers import contract_dict

    from halo.repair import MaskedLMRepairer

    model = tiny_distilbert(len(mlm_tokenizer)).cuda()
    ids = sp_host_tokenizer("The object returns a list of values for the function.", add_special_tokens=False)["input_ids"]
    dicts = [contract_dict(ids, j, j) for j in range(1, len(ids))]
    kw = dict(host_tokenizer=sp_host_tokenizer, model=model, tokenizer=mlm_tokenizer, min_margin=float("-inf"))
    assert MaskedLMRepairer(cuda_graphs=True, **kw).repair(dicts) == MaskedLMRepairer(cuda_graphs=False, **kw).repair(dicts)


@cuda
@pytest.mark.cuda
def test_self_repairer_with_graphs_matches_eager_on_cuda():
    from repair_helpers import contract_dict, tiny_llama

    from halo.repair import SelfRepairer, validate_contract_dicts

    model = tiny_llama(211, seed=3).cuda()
    g = torch.Generator().manual_seed(0)
    dicts = [contract_dict(torch.randint(0, 211, (w,), generator=g), w // 2, 10 * w) for w in (5, 40, 77, 200)]
    batch = validate_contract_dicts(dicts)
    graphed = SelfRepairer(model, cuda_graphs=True, min_margin=float("-inf"))
    eager = SelfRepairer(model, cuda_graphs=False, min_margin=float("-inf"))
    for _ in range(2):  # capture, then replay
        a, b = graphed.suggest(batch), eager.suggest(batch)
        assert torch.equal(a.token_ids, b.token_ids)
        torch.testing.assert_close(a.margin, b.margin, rtol=1e-4, atol=1e-4)
    assert graphed.row_logits.captured_shapes


@cuda
@pytest.mark.cuda
def test_kind_restricted_self_repair_with_graphs_matches_eager_on_cuda(sp_host_tokenizer):
    """The kind mask runs on the replayed logits (tensor ops only): same diffs as eager, every one kind-true."""
    from repair_helpers import contract_dict, tiny_llama

    from halo.repair import SelfRepairer, validate_contract_dicts

    model = tiny_llama(len(sp_host_tokenizer), seed=3).cuda()
    text = "The object returns a list of values for the function."
    ids = sp_host_tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = validate_contract_dicts([contract_dict(ids, j, j) for j in range(1, len(ids))])
    graphed = SelfRepairer(model, sp_host_tokenizer, cuda_graphs=True, min_margin=float("-inf"))
    eager = SelfRepairer(model, sp_host_tokenizer, cuda_graphs=False, min_margin=float("-inf"))
    for _ in range(2):  # capture, then replay
        a, b = graphed.suggest(batch), eager.suggest(batch)
        assert torch.equal(a.token_ids, b.token_ids)
    diffs = graphed.repair_batch(batch)
    kinds = graphed.kinds.cpu()
    assert diffs and all(int(kinds[old]) == int(kinds[new]) for _, old, new in diffs)
