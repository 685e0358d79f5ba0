"""The Step 3d contract: exact dict format in, exact tuple format out, every bad dict rejected up front."""

import math

import pytest
import torch
from repair_helpers import CallCounter, contract_dict, tiny_llama

from halo.repair import CONTRACT_KEYS, SelfRepairer, validate_contract_dicts

VOCAB = 97


@pytest.fixture(scope="module")
def repairer():
    return SelfRepairer(tiny_llama(VOCAB), min_margin=-math.inf)


def _windows(seed=0, k=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        w = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (w,), generator=g).tolist()
        out.append(contract_dict(ids, int(torch.randint(1, w, (1,), generator=g)), 1000 * i + 7))
    return out


def test_keys_are_the_contract():
    assert CONTRACT_KEYS == ("global_cull_position", "window_token_ids", "window_attention_mask",
                             "window_brightness_map", "masked_position_local", "original_token_id_at_mask")


def test_output_is_exact_tuples_only_where_changed(repairer):
    dicts = _windows()
    batch = validate_contract_dicts(dicts)
    predicted = repairer.suggest(batch).token_ids.tolist()
    # Half of the targets already hold the model's prediction: they must not appear.
    for i in range(0, len(dicts), 2):
        j = dicts[i]["masked_position_local"]
        dicts[i]["window_token_ids"][j] = predicted[i]
        dicts[i]["original_token_id_at_mask"] = predicted[i]
    diffs = repairer.repair(dicts)
    expected = [(d["global_cull_position"], d["original_token_id_at_mask"], predicted[i])
                for i, d in enumerate(dicts) if predicted[i] != d["original_token_id_at_mask"]]
    assert diffs == expected
    assert len(diffs) >= 1
    for diff in diffs:
        assert type(diff) is tuple and len(diff) == 3 and all(type(x) is int for x in diff)
        assert diff[1] != diff[2] and 0 <= diff[2] < VOCAB


def test_global_cull_position_is_the_reported_position(repairer):
    dicts = _windows(seed=1, k=3)
    for i, d in enumerate(dicts):
        d["global_cull_position"] = 10**9 + 17 * i
    predicted = repairer.suggest(validate_contract_dicts(dicts)).token_ids.tolist()
    for d, p in zip(dicts, predicted):  # make every target differ from the prediction
        j = d["masked_position_local"]
        d["window_token_ids"][j] = (p + 1) % VOCAB
        d["original_token_id_at_mask"] = (p + 1) % VOCAB
    assert [x[0] for x in repairer.repair(dicts)] == [d["global_cull_position"] for d in dicts]


def test_bool_and_long_masks_and_padding_are_accepted(repairer):
    d1 = contract_dict([5, 6, 7, 8, 0, 0], 2, 3, mask=[1, 1, 1, 1, 0, 0])
    d2 = contract_dict([5, 6, 7, 8], 2, 3, mask=torch.tensor([True, True, True, True]))
    b = validate_contract_dicts([d1, d2])
    assert b.token_ids.shape == (2, 6) and b.attention_mask.dtype == torch.bool
    assert torch.equal(b.attention_mask.sum(1), torch.tensor([4, 4]))
    s = repairer.suggest(b).token_ids
    assert s[0] == s[1]  # padding does not change the prediction
    assert repairer.repair([]) == []


def _bad_cases():
    def drop(key):
        def f(d):
            del d[key]
        return f

    def setv(key, value):
        def f(d):
            d[key] = value(d) if callable(value) else value
        return f

    def nan(d):
        d["window_brightness_map"][1] = float("nan")

    return {
        "missing global_cull_position": (drop("global_cull_position"), "missing key"),
        "missing window_brightness_map": (drop("window_brightness_map"), "missing key"),
        "unexpected key": (setv("extra", 1), "unexpected key"),
        "W > 511": (lambda d: d.update(contract_dict(list(range(512)), 3, 5)), "outside 1..511"),
        "empty window": (lambda d: d.update(window_token_ids=torch.zeros(0, dtype=torch.long),
                                            window_attention_mask=torch.zeros(0, dtype=torch.long),
                                            window_brightness_map=torch.zeros(0)), "outside 1..511"),
        "mask position past the end": (setv("masked_position_local", 10), "outside the window"),
        "mask position negative": (setv("masked_position_local", -1), "outside the window"),
        "mask position on padding": (lambda d: d["window_attention_mask"].__setitem__(4, 0), "on padding"),
        "mask length mismatch": (setv("window_attention_mask", torch.ones(9, dtype=torch.long)), "length mismatch"),
        "brightness length mismatch": (setv("window_brightness_map", torch.ones(11)), "length mismatch"),
        "NaN brightness": (nan, "NaN"),
        "float token ids": (setv("window_token_ids", lambda d: d["window_token_ids"].float()), "integer"),
        "2-D token ids": (setv("window_token_ids", lambda d: d["window_token_ids"][None]), "1-D"),
        "list instead of tensor": (setv("window_token_ids", lambda d: d["window_token_ids"].tolist()), "torch.Tensor"),
        "mask values not 0/1": (lambda d: d["window_attention_mask"].__setitem__(0, 2), "only 0 and 1"),
        "original id mismatch": (setv("original_token_id_at_mask", lambda d: d["original_token_id_at_mask"] + 1),
                                 "original_token_id_at_mask"),
        "token id outside vocab": (lambda d: d["window_token_ids"].__setitem__(0, VOCAB), "outside the host vocabulary"),
        "not a dict": (None, "expected a dict"),
        "float position": (setv("global_cull_position", 3.0), "must be an int"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_dicts_raise_naming_the_window_and_run_nothing(repairer, case):
    mutate, needle = _bad_cases()[case]
    dicts = [contract_dict(list(range(10, 20)), 4, 100 + i) for i in range(4)]
    if mutate is None:
        dicts[2] = ("not", "a", "dict")
    else:
        mutate(dicts[2])
    with CallCounter(repairer.decoder) as counter:
        with pytest.raises(ValueError) as err:
            repairer.repair(dicts)
    assert "window 2" in str(err.value) and needle in str(err.value), str(err.value)
    assert counter.calls == [0]  # validated before anything ran


def test_not_a_list_raises(repairer):
    with pytest.raises(ValueError, match="list of dicts"):
        repairer.repair(contract_dict([1, 2, 3], 1, 0))
