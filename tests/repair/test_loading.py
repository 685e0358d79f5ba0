"""`load_repairer`: the right backend for a spec, or one `RepairModelError` line, offline and before any weights.

Models and tokenizers are saved into tmp_path with `save_pretrained` (random weights, nothing downloaded); a
guard records any attempt to open a network connection, and there must be none.
"""

import math
import socket

import pytest
import torch
from repair_helpers import contract_dict, tiny_distilbert, tiny_llama

from halo.repair import (MaskedLMRepairer, RepairModelError, SelfRepairer, TokenKind, load_repairer,
                         validate_contract_dicts)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Records (and refuses) every outgoing connection; the test fails if there was one."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == []


def load_error(spec, host, model=None) -> RepairModelError:
    with pytest.raises(RepairModelError) as info:
        load_repairer(spec, model, host)
    err = info.value
    assert isinstance(err, ValueError)
    message = str(err)
    assert "\n" not in message and message.startswith(f"repair model {spec!r}: ")
    return err


def test_self_spec_returns_the_host_model_backend(sp_host_tokenizer):
    model = tiny_llama(len(sp_host_tokenizer), seed=2)
    rep = load_repairer("self", model, sp_host_tokenizer, repair_threshold=80.0)
    assert isinstance(rep, SelfRepairer) and rep.model is model and rep.repair_threshold == 80.0
    word = sp_host_tokenizer.convert_tokens_to_ids("\u2581the")
    assert int(rep.kinds[word]) == TokenKind.WORD_START


def test_gate_guidance_and_rerank_reach_the_backend(tmp_path, sp_host_tokenizer, mlm_model, mlm_tokenizer):
    model = tiny_llama(len(sp_host_tokenizer), seed=2)
    rep = load_repairer("self", model, sp_host_tokenizer, min_margin=2.5, guidance="none", rerank_top=4)
    assert (rep.min_margin, rep.guidance, rep.rerank_top) == (2.5, "none", 4)
    mlm_model.save_pretrained(tmp_path)
    mlm_tokenizer.save_pretrained(tmp_path)
    mlm = load_repairer(str(tmp_path), None, sp_host_tokenizer, device="cpu", min_margin=1.0, guidance="soft",
                        rerank_top=4)  # re-ranking is the self backend's; a masked LM reads both sides anyway
    assert isinstance(mlm, MaskedLMRepairer) and (mlm.min_margin, mlm.guidance) == (1.0, "soft")


def test_masked_lm_folder_returns_a_bridged_backend(tmp_path, sp_host_tokenizer, mlm_model, mlm_tokenizer):
    mlm_model.save_pretrained(tmp_path)
    mlm_tokenizer.save_pretrained(tmp_path)
    rep = load_repairer(str(tmp_path), None, sp_host_tokenizer, device="cpu", repair_threshold=50.0)
    assert isinstance(rep, MaskedLMRepairer) and rep.repair_threshold == 50.0
    same = MaskedLMRepairer(host_tokenizer=sp_host_tokenizer, model=mlm_model, tokenizer=mlm_tokenizer,
                            repair_threshold=50.0)
    ids = sp_host_tokenizer("The object returns a list of values.", add_special_tokens=False)["input_ids"]
    batch = validate_contract_dicts([contract_dict(ids, j, j) for j in range(1, len(ids))])
    assert torch.equal(rep.suggest(batch).token_ids, same.suggest(batch).token_ids)


def test_unknown_name_is_not_found_offline(sp_host_tokenizer):
    err = load_error("bogus-model", sp_host_tokenizer)
    assert err.model == "bogus-model" and "not found offline" in err.reason


def test_missing_folder_is_not_found_offline(tmp_path, sp_host_tokenizer):
    assert "not found offline" in load_error(str(tmp_path / "absent"), sp_host_tokenizer).reason


def test_causal_lm_is_not_a_masked_lm(tmp_path, sp_host_tokenizer):
    tiny_llama(64).save_pretrained(tmp_path)
    err = load_error(str(tmp_path), sp_host_tokenizer)
    assert err.reason == "not a masked LM (LlamaForCausalLM)"


def test_encoder_without_masked_lm_head_is_not_a_masked_lm(tmp_path, sp_host_tokenizer):
    from transformers import BertConfig

    BertConfig(architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path)
    assert "not a masked LM (BertForSequenceClassification" in load_error(str(tmp_path), sp_host_tokenizer).reason


def test_tokenizer_without_mask_token_is_not_a_masked_lm(tmp_path, sp_host_tokenizer, mlm_model):
    mlm_model.config.save_pretrained(tmp_path)
    sp_host_tokenizer.save_pretrained(tmp_path)  # a tokenizer with no [MASK]
    assert "no mask token" in load_error(str(tmp_path), sp_host_tokenizer).reason


def _wordpiece(vocab: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def test_vocabulary_without_bridge_fails_before_the_weights(tmp_path, sp_host_tokenizer):
    tokenizer = _wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u0436\u0443\u043a", "##\u0449"])
    tiny_distilbert(len(tokenizer)).config.save_pretrained(tmp_path)  # config only: the weights are never read
    tokenizer.save_pretrained(tmp_path)
    assert "no bridge to the host tokenizer" in load_error(str(tmp_path), sp_host_tokenizer).reason


def test_missing_weights_are_reported(tmp_path, sp_host_tokenizer, mlm_model, mlm_tokenizer):
    mlm_model.config.save_pretrained(tmp_path)
    mlm_tokenizer.save_pretrained(tmp_path)
    assert "weights cannot be loaded offline" in load_error(str(tmp_path), sp_host_tokenizer).reason


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec(spec, sp_host_tokenizer):
    load_error(spec, sp_host_tokenizer)


def test_direct_construction_fails_the_same_way(sp_host_tokenizer):
    with pytest.raises(RepairModelError, match="'bogus-model': not found offline"):
        MaskedLMRepairer("bogus-model", host_tokenizer=sp_host_tokenizer, min_margin=-math.inf)
