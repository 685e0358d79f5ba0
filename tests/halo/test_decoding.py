"""halo.decoding: the generate loop's checks and the decode loop (sample, stop at end-of-sequence, feed back)."""

import pytest
import torch

from halo.decoding import check_generate, decode


def one_hot(token_id, size=8):
    logits = torch.full((size,), -10.0)
    logits[token_id] = 10.0
    return logits


@pytest.mark.parametrize("args, match", [
    ((-1, 0.0, None, None), "max_new_tokens"), ((2.5, 0.0, None, None), "max_new_tokens"),
    ((2, -1.0, None, None), "sampling"), ((2, 1.0, 0, None), "sampling"), ((2, 1.0, None, 1.5), "sampling"),
])
def test_bad_settings_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        check_generate(*args)


def test_greedy_loop_feeds_each_token_back_and_stops_at_eos():
    fed, told = [], []

    def step(token):  # the stream answers token t with logits that pick t + 1
        assert token.shape == (1,) and token.dtype == torch.int64
        fed.append(int(token))
        assert told[-1] == int(token), "on_token hears of a token before it is fed"
        return one_hot(int(token) + 1)

    out = decode(one_hot(2), step, 10, eos={5}, on_token=told.append)
    assert out == [2, 3, 4] and fed == [2, 3, 4] and told == [2, 3, 4]  # 5 is neither fed nor returned
    assert decode(one_hot(2), step, 0) == []


def test_seeded_sampling_repeats_and_missing_context_is_refused():
    def step(token):
        return torch.zeros(8)

    runs = [decode(torch.zeros(8), step, 12, temperature=1.0, seed=7) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 12
    with pytest.raises(ValueError, match="feed"):
        decode(None, step, 3)
