"""halo.model_runner.ModelRunner: stream forwards give the model's logits, patches flush, the model's time counts."""

import torch

from halo import HaloCache, HaloConfig
from halo.forward import stream_spec
from halo.model_runner import ModelRunner


class NothingPending:
    """A stand-in RepairScheduler with no pending patches."""

    def patch_slots(self, cache):
        return None

    def patches_done(self):
        raise AssertionError("no patch forward ran")


def test_stream_logits_are_the_models_and_time_is_counted(tiny_model):
    cache = HaloCache(tiny_model, HaloConfig(budget=64, sink_tokens=2, recent_tokens=8))
    runner = ModelRunner(tiny_model, cache)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    logits, result = runner.stream(stream_spec(cache, ids, "user"))
    with torch.inference_mode():
        expected = tiny_model(input_ids=ids[None]).logits[0, -1]
    assert logits.shape == (tiny_model.config.vocab_size,)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert result.slots_written == (0, 8) and cache.n_valid == 8 and runner.seconds > 0
    assert runner.flush_patches(NothingPending()) == 0
