"""Save and load a Session's compacted memory.

Format: ONE file, a safetensors container. Its tensors are the retained slots in slot order (K/V of shape
[L, 2, Hkv, n, D] and each per-slot field [n]) plus the last logits; its string metadata holds, under the key
`halo`, a JSON document with the format version, the model identity, the config (sources as dicts), the
counters, the journal entries, the repair diffs, an optional caller `extra` dict, and a SHA-256 checksum per
tensor (safetensors checks the structure; the checksums catch flipped bytes in the data).

Writing is atomic: the file is written to a temporary file in the destination folder, fsynced, and moved over
the destination with `os.replace`, so a crash leaves either the old file or the new one, never a half file.

Loading checks the model identity (type, layers, KV heads, head dim, vocab size, dtype, name and a fingerprint
of the first embedding rows) and every tensor's shape, and raises ValueError naming the first mismatch; a
truncated or corrupted file raises ValueError too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .atomic import atomic_replace
from .cache import SLOT_FIELDS as _SLOT_FIELDS
from .config import HaloConfig, SourcePolicy
from .journal import JournalEntry


FORMAT = "halo-weave-session"
VERSION = 1
_COUNTERS = ("seen", "steps", "next_serial", "next_unit", "unit_slots")


# ----------------------------------------------------------------- identity
def model_identity(model) -> dict:
    """JSON-able description of a model, precise enough to refuse loading a memory into another model."""
    mc = model.config
    heads = mc.num_attention_heads
    param = next(model.parameters())
    emb = model.get_input_embeddings().weight.detach()[:16].to("cpu").contiguous()
    fingerprint = hashlib.sha256(emb.view(torch.uint8).numpy().tobytes()).hexdigest()[:32]
    return {
        "name_or_path": str(getattr(mc, "name_or_path", "") or ""),
        "model_type": str(getattr(mc, "model_type", "")),
        "num_layers": int(mc.num_hidden_layers),
        "num_kv_heads": int(getattr(mc, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(mc, "head_dim", None) or mc.hidden_size // heads),
        "vocab_size": int(mc.vocab_size),
        "dtype": str(param.dtype),
        "embedding_fingerprint": fingerprint,
    }


def config_to_dict(config: HaloConfig) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "sources":
            value = {name: dataclasses.asdict(policy) for name, policy in value.items()}
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(data: dict) -> HaloConfig:
    known = {f.name for f in dataclasses.fields(HaloConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"saved config has unknown fields {sorted(unknown)} (saved by a newer halo?)")
    data = dict(data)
    if "sources" in data:
        data["sources"] = {name: SourcePolicy(**policy) for name, policy in data["sources"].items()}
    if "unit_sources" in data:
        data["unit_sources"] = tuple(data["unit_sources"])
    return HaloConfig(**data)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------- save
def save_session(session, path, *, extra: dict | None = None) -> Path:
    """Write `session`'s memory to the single file `path` (atomically). Returns the path.

    Args:
        extra: optional JSON-able dict stored alongside (e.g. a chat front end's message history); a loaded
            session carries it back as `session.extra`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save path {path} is a directory; give a file name (a session is one file)")
    cache = session.cache
    if cache._forward is not None or cache.culled_units:
        raise RuntimeError("cannot save in the middle of a forward")
    session.flush_repairs()  # the saved K/V must match the mirror
    n = cache.n_valid
    tensors = {"kv": cache.kv[:, :, :, :n].detach().to("cpu").contiguous()}
    for name in (*_SLOT_FIELDS, *cache._extra_fields):
        tensors[f"slot.{name}"] = getattr(cache, name)[:n].detach().to("cpu").contiguous()
    if session._last_logits is not None:
        tensors["last_logits"] = session._last_logits.detach().to("cpu").contiguous()
    if extra is None:
        extra = getattr(session, "extra", None)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_identity(session.model),
        "config": config_to_dict(session.config),
        "policy": getattr(cache.policy, "name", type(cache.policy).__name__),
        "extra_fields": list(cache._extra_fields),
        "counters": {name: int(getattr(cache, name)) for name in _COUNTERS} | {
            "n_valid": n, "pinned_tokens": int(session.pinned_tokens)},
        "timings": {"halo_seconds": cache.halo_seconds, "model_seconds": session.model_seconds},
        "marker_ids": list(session._marker_ids),
        "journal": [[e.position, e.token_id, e.source, e.brightness, e.step, e.kind] for e in session.journal.entries],
        "diffs": [list(map(int, d)) for d in session.diffs],
        "extra": extra or {},
        "checksums": {name: _digest(t) for name, t in tensors.items()},
    }
    try:
        text = json.dumps(meta)
    except TypeError as err:
        raise ValueError(f"session metadata is not JSON-serialisable: {err}") from None
    return atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata={"halo": text}))


# --------------------------------------------------------------------- load
def read_file(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved session, structure and checksums verified; ValueError when damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved session at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("halo")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncation/garbage
        raise ValueError(f"{path} is not a readable halo session file (truncated or corrupted?): {err}") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a halo session (no 'halo' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: session metadata is corrupted ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a halo session file")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} has session format version {meta.get('version')}; this halo reads {VERSION}")
    sums = meta.get("checksums", {})
    if set(sums) != set(tensors):
        raise ValueError(f"{path}: tensor list {sorted(tensors)} does not match the recorded {sorted(sums)} (corrupted)")
    for name, tensor in tensors.items():
        if _digest(tensor) != sums[name]:
            raise ValueError(f"{path}: checksum mismatch in tensor {name!r} (the file is corrupted)")
    return meta, tensors


def check_identity(saved: dict, model, *, check_name: bool = True) -> None:
    """Raise ValueError naming the first way `model` differs from the saved identity."""
    current = model_identity(model)
    keys = ["model_type", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "dtype", "embedding_fingerprint"]
    if check_name:
        keys.insert(0, "name_or_path")
    for key in keys:
        if saved.get(key) != current[key]:
            what = "weights (embedding fingerprint)" if key == "embedding_fingerprint" else key
            raise ValueError(f"saved session belongs to a different model: {what} is {saved.get(key)!r} in the file "
                             f"but {current[key]!r} in the given model")


def load_session(path, model, tokenizer, *, policy=None, check_name: bool = True):
    """Rebuild a Session from `path` on `model` (+ `tokenizer`); it continues exactly where the saved one stopped.

    Args:
        policy: cull policy for the new session (default HaloPolicy); its name must match the saved one.
        check_name: also require model.config.name_or_path to match (set False to load across a rename).
    Raises:
        FileNotFoundError: no such file. ValueError: damaged file, or a model/tokenizer/shape mismatch.
    """
    from .session import Session

    meta, tensors = read_file(path)
    try:
        check_identity(meta["model"], model, check_name=check_name)
        config = config_from_dict(meta["config"])
        counters = meta["counters"]
        n = int(counters["n_valid"])
        session = Session(model, tokenizer, config, policy=policy)
        cache = session.cache
        saved_policy, new_policy = meta["policy"], getattr(cache.policy, "name", type(cache.policy).__name__)
        if saved_policy != new_policy:
            raise ValueError(f"saved session used cull policy {saved_policy!r}; the new session has {new_policy!r}")
        if list(session._marker_ids) != list(meta["marker_ids"]):
            raise ValueError("saved session belongs to a different tokenizer: the elision marker tokenises to "
                             f"{meta['marker_ids']} in the file but {session._marker_ids} now")
        if list(meta["extra_fields"]) != list(cache._extra_fields):
            raise ValueError(f"saved per-slot policy fields {meta['extra_fields']} differ from {cache._extra_fields}")
        expected = {"kv": (cache.num_layers, 2, cache.num_kv_heads, n, cache.head_dim)}
        for name in (*_SLOT_FIELDS, *cache._extra_fields):
            expected[f"slot.{name}"] = (n,)
        for name, shape in expected.items():
            if name not in tensors:
                raise ValueError(f"saved session lacks tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"saved tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if tensors["kv"].dtype != cache.dtype:
            raise ValueError(f"saved K/V are {tensors['kv'].dtype}; the model's cache holds {cache.dtype}")
        for name in (*_SLOT_FIELDS, *cache._extra_fields):
            if tensors[f"slot.{name}"].dtype != getattr(cache, name).dtype:
                raise ValueError(f"saved slot field {name!r} is {tensors[f'slot.{name}'].dtype}, "
                                 f"expected {getattr(cache, name).dtype}")
        if "last_logits" in tensors and tuple(tensors["last_logits"].shape) != (session.vocab_size,):
            raise ValueError(f"saved last logits have shape {tuple(tensors['last_logits'].shape)}, "
                             f"expected ({session.vocab_size},)")
        if n > cache.capacity:
            cache._grow(n)
        dev = cache.device
        cache.kv[:, :, :, :n] = tensors["kv"].to(dev)
        for name in (*_SLOT_FIELDS, *cache._extra_fields):
            getattr(cache, name)[:n] = tensors[f"slot.{name}"].to(dev)
        cache.n_valid = n
        for name in _COUNTERS:
            setattr(cache, name, int(counters[name]))
        cache.halo_seconds = float(meta["timings"]["halo_seconds"])
        session.model_seconds = float(meta["timings"]["model_seconds"])
        session.pinned_tokens = int(counters["pinned_tokens"])
        names = config.source_names
        entries = []
        for position, token_id, source, bright, step, *rest in meta["journal"]:
            kind = str(rest[0]) if rest else "evicted"  # files written before kinds were saved
            if source not in names:
                raise ValueError(f"journal entry names unknown source {source!r}")
            if kind not in ("evicted", "replaced"):
                raise ValueError(f"journal entry has unknown kind {kind!r}")
            entries.append(JournalEntry(int(position), int(token_id), str(source), float(bright), int(step), kind))
        cache.journal.entries.extend(entries)
        session.diffs = [tuple(int(x) for x in d) for d in meta["diffs"]]
        session._last_logits = tensors["last_logits"].to(dev) if "last_logits" in tensors else None
        session.extra = dict(meta.get("extra") or {})
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: session metadata is incomplete or malformed ({type(err).__name__}: {err})") from None
    return session
