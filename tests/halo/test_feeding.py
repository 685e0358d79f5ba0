"""halo.feeding.Feed: checks in order, line units for log/tool text, forwards that cover the feed, pinned count."""

import pytest
import torch

from halo import HaloConfig
from halo.feeding import Feed
from halo.units import tokenize_lines

LOG = "12:00 worker 0 ok\n12:01 worker 1 ok\n12:02 worker 2 failed\n"


def fresh_ids():
    """A stand-in for HaloCache.new_unit_ids: consecutive ids from 100."""
    counter = [100]

    def new_unit_ids(count):
        ids = torch.arange(counter[0], counter[0] + count)
        counter[0] += count
        return ids

    return new_unit_ids


def test_text_is_checked_in_order(tiny_tok):
    config = HaloConfig()
    with pytest.raises(TypeError, match="str"):
        Feed.of_text(tiny_tok, config, b"bytes", "nobody", first=True)
    with pytest.raises(ValueError, match="empty"):
        Feed.of_text(tiny_tok, config, "", "nobody", first=True)
    with pytest.raises(ValueError, match="unknown source"):
        Feed.of_text(tiny_tok, config, "hello", "nobody", first=True)


def test_log_text_carries_line_indices_and_other_text_none(tiny_tok):
    config = HaloConfig()
    log = Feed.of_text(tiny_tok, config, LOG, "log", first=False)
    ids, lines = tokenize_lines(tiny_tok, LOG, add_special_tokens=False)
    assert log.token_ids.dtype == torch.int64 and log.token_ids.tolist() == ids and log.lines == lines
    user = Feed.of_text(tiny_tok, config, "hello there", "user", first=False)
    assert user.lines is None and len(user) == len(tiny_tok("hello there")["input_ids"])


def test_forwards_cover_the_feed_and_give_each_line_one_fresh_unit(tiny_tok):
    log = Feed.of_text(tiny_tok, HaloConfig(), LOG, "log", first=False)
    pieces = list(log.forwards(5, fresh_ids()))
    assert all(ids.numel() <= 5 for ids, _ in pieces)
    assert torch.cat([ids for ids, _ in pieces]).tolist() == log.token_ids.tolist()
    units = torch.cat([u for _, u in pieces]).tolist()
    assert units == [100 + line for line in log.lines]
    plain = Feed(torch.arange(7), "user")
    assert [(ids.tolist(), units) for ids, units in plain.forwards(3, fresh_ids())] == [
        ([0, 1, 2], None), ([3, 4, 5], None), ([6], None)]


def test_ids_are_checked_and_cast_to_int64():
    config = HaloConfig()
    feed = Feed.of_ids(torch.tensor([1, 2, 3], dtype=torch.int32), "tool", config, 10, torch.device("cpu"))
    assert feed.token_ids.dtype == torch.int64 and len(feed) == 3 and feed.lines is None
    with pytest.raises(ValueError, match="out of range"):
        Feed.of_ids(torch.tensor([1, 10]), "user", config, 10, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown source"):
        Feed.of_ids(torch.tensor([1]), "nobody", config, 10, torch.device("cpu"))


def test_pinned_tokens_grow_only_for_pinned_sources_and_must_fit():
    config = HaloConfig(budget=40, sink_tokens=2, recent_tokens=8)
    assert Feed(torch.arange(5), "user").pinned_tokens_after(config, 3) == 3
    assert Feed(torch.arange(5), "system").pinned_tokens_after(config, 3) == 8
    with pytest.raises(ValueError, match="protected set"):
        Feed(torch.arange(28), "system").pinned_tokens_after(config, 3)
