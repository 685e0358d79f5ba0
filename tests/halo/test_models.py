"""The embedded SmolLM2 end to end (real weights, converted once into the user cache)."""

import math

import pytest
import torch

from halo import HaloConfig, ModelNotFoundError, Session, load_model
from halo.text import embedded_text

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def test_embedded_model_loads_and_predicts_sensibly(smollm):
    model, tok = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tok.decode(int(logits.argmax())).strip() == "Paris"


def test_session_on_real_text_keeps_the_budget(smollm):
    model, tok = smollm
    session = Session(model, tok, HaloConfig(budget=96, sink_tokens=4, recent_tokens=24, chunk_size=32))
    text = embedded_text(max_chars=1500)
    session.feed(text)
    reply = session.generate(8)
    stats = session.stats()
    assert stats["retained"] <= 96 and stats["evicted"] > 0
    assert stats["tokens_fed"] == stats["remembered"] + stats["evicted"] - stats["markers"]
    assert stats["remembered"] >= stats["retained"]  # per-layer memory (the default): layers keep different tokens
    assert isinstance(reply, str) and math.isfinite(stats["model_seconds"])


def test_missing_model_gives_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path / "no-such-model"))
