"""Session.save / Session.load: exact continuation, atomic single-file format, refusal of damage and mismatch."""

import json
import os

import pytest
import torch

from halo import HaloConfig, Session
from halo.persist import read_file
from tiny import tiny_llama

CONFIG = dict(budget=80, sink_tokens=2, recent_tokens=8, chunk_size=8)
LOG = "".join(f"12:{i:02d} worker {i % 3} ok\n" for i in range(24))


def busy_session(model, tok, **changes):
    session = Session(model, tok, HaloConfig(**{**CONFIG, **changes}))
    session.feed("You are terse.", source="system")
    session.feed("The quick brown fox jumps over the lazy dog. " * 4)
    session.feed(LOG, source="log")
    session.generate(6)
    return session


@pytest.mark.parametrize("key_refresh", [1, 3])  # 3: the kept key novelty travels with the slots
def test_loaded_session_continues_exactly(tiny_tok, tmp_path, key_refresh):
    tok = tiny_tok
    original = busy_session(tiny_llama(vocab=len(tok)), tok, key_refresh=key_refresh)
    original.diffs.append((5, 7, 9))
    path = original.save(tmp_path / "s.halo")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    restored = Session.load(path, tiny_llama(vocab=len(tok)), tok)
    assert restored.memory_text() == original.memory_text()
    assert restored.journal.entries == original.journal.entries
    assert restored.diffs == original.diffs
    assert restored.pinned_tokens == original.pinned_tokens
    counters = restored.cache.state_dict()["counters"]
    assert counters == original.cache.state_dict()["counters"]
    assert set(counters) == {"seen", "steps", "next_serial", "next_unit", "unit_slots", "n_valid"}
    # generating straight away uses the saved last logits
    assert restored.generate(3) == original.generate(3)
    replies = []
    for session in (original, restored):
        session.feed("And then the dog barked twice.")
        session.feed(LOG[:60], source="log")
        replies.append(session.generate(12))
    assert replies[0] == replies[1]
    cache, twin = original.cache, restored.cache
    assert torch.equal(cache.layer_counts, twin.layer_counts)
    for layer in range(cache.num_layers):  # each layer's own slots (per-layer memory, the default)
        n = cache.layer_length(layer)
        assert torch.equal(cache.kv[layer, :, :, :n], twin.kv[layer, :, :, :n])
        assert torch.equal(cache.brightness[layer, :n], twin.brightness[layer, :n])
        assert torch.equal(cache.positions[layer, :n], twin.positions[layer, :n])
    assert original.journal.entries == restored.journal.entries


def test_save_is_one_file_with_json_metadata(tiny_pair, tmp_path):
    model, tok = tiny_pair
    session = busy_session(model, tok)
    session.save(tmp_path / "s.halo", extra={"note": "hi"})
    meta, tensors = read_file(tmp_path / "s.halo")
    assert meta["model"]["num_layers"] == 2 and meta["model"]["vocab_size"] == len(tok)
    assert meta["config"]["sources"]["system"]["pinned"] is True
    assert tensors["cache.kv"].shape[3] == session.cache.n_valid
    assert Session.load(tmp_path / "s.halo", model, tok).extra == {"note": "hi"}
    # overwriting replaces atomically
    session.feed("more text here")
    session.save(tmp_path / "s.halo")
    assert Session.load(tmp_path / "s.halo", model, tok).cache.seen == session.cache.seen


@pytest.mark.parametrize("change, word", [
    (dict(layers=3), "num_layers"), (dict(kv_heads=4), "num_kv_heads"), (dict(hidden=128), "head_dim"),
    (dict(vocab=400), "vocab_size"), (dict(seed=1), "weights"), (dict(dtype=torch.bfloat16), "dtype"),
])
def test_load_refuses_a_different_model(tiny_pair, tmp_path, change, word):
    model, tok = tiny_pair
    busy_session(model, tok).save(tmp_path / "s.halo")
    kwargs = dict(vocab=len(tok)) | change
    other = tiny_llama(**kwargs)
    with pytest.raises(ValueError, match=word):
        Session.load(tmp_path / "s.halo", other, tok)


def test_load_refuses_another_name(tiny_pair, tmp_path):
    model, tok = tiny_pair
    busy_session(model, tok).save(tmp_path / "s.halo")
    model.config.name_or_path = "someone/else"
    with pytest.raises(ValueError, match="name_or_path"):
        Session.load(tmp_path / "s.halo", model, tok)
    assert Session.load(tmp_path / "s.halo", model, tok, check_name=False).cache.seen > 0


def test_truncated_and_corrupted_files_are_refused(tiny_pair, tmp_path):
    model, tok = tiny_pair
    path = busy_session(model, tok).save(tmp_path / "s.halo")
    data = path.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "t.halo").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupted|not a halo"):
            Session.load(tmp_path / "t.halo", model, tok)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # inside the tensor data
    (tmp_path / "c.halo").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum|corrupted"):
        Session.load(tmp_path / "c.halo", model, tok)
    (tmp_path / "g.halo").write_bytes(b"not a session at all" * 10)
    with pytest.raises(ValueError):
        Session.load(tmp_path / "g.halo", model, tok)
    with pytest.raises(FileNotFoundError):
        Session.load(tmp_path / "missing.halo", model, tok)


def test_metadata_tampering_is_refused(tiny_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = tiny_pair
    path = busy_session(model, tok).save(tmp_path / "s.halo")
    meta, _ = read_file(path)
    tensors = load_file(str(path))
    tensors["cache.slots.positions"] = tensors["cache.slots.positions"][:-1]
    meta["checksums"]["cache.slots.positions"] = __import__("halo.persist", fromlist=["x"])._digest(
        tensors["cache.slots.positions"])
    save_file(tensors, str(tmp_path / "bad.halo"), metadata={"halo": json.dumps(meta)})
    with pytest.raises(ValueError, match="shape"):
        Session.load(tmp_path / "bad.halo", model, tok)


def test_a_failed_save_leaves_the_old_file(tiny_pair, tmp_path, monkeypatch):
    import safetensors.torch

    model, tok = tiny_pair
    session = busy_session(model, tok)
    path = session.save(tmp_path / "s.halo")
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        session.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.halo"]


def test_configs_saved_before_the_tuned_repair_targeting_repair_as_they_did():
    from halo.persist import config_from_dict, config_to_dict

    saved = config_to_dict(HaloConfig(repair="self"))
    assert config_from_dict(saved) == HaloConfig(repair="self")  # today's files: as saved
    for field in ("repair_margin", "repair_guidance", "repair_rerank"):
        del saved[field]
    old = config_from_dict(saved)
    assert (old.repair_margin, old.repair_guidance, old.repair_rerank) == (0.0, "hard", None)


def test_configs_saved_before_recall_read_heads_apart_recall_by_the_head_mean():
    from halo.persist import config_from_dict, config_to_dict

    saved = config_to_dict(HaloConfig(recall=True))
    assert config_from_dict(saved).recall_heads == HaloConfig().recall_heads  # today's files: as saved
    del saved["recall_heads"]
    assert config_from_dict(saved).recall_heads == "mean"


def test_configs_saved_before_key_novelty_cull_by_the_basis_alone():
    from halo.persist import config_from_dict, config_to_dict

    saved = config_to_dict(HaloConfig())
    assert config_from_dict(saved).key_weight == HaloConfig().key_weight > 0  # today's files: as saved
    del saved["key_weight"]
    assert config_from_dict(saved).key_weight == 0.0
    saved = config_to_dict(HaloConfig(key_refresh=4))
    assert config_from_dict(saved).key_refresh == 4  # today's files: as saved
    del saved["key_refresh"]
    assert config_from_dict(saved).key_refresh == 1  # saved before key_refresh: novelty at every cull, as then


def test_configs_saved_before_memory_positions_keep_text_positions():
    from halo.persist import config_from_dict, config_to_dict

    saved = config_to_dict(HaloConfig(recall=True))
    assert config_from_dict(saved).rope_positions == "auto"  # today's files: as saved
    del saved["rope_positions"]
    assert config_from_dict(saved).rope_positions == "text"
