"""The session file: a container for state dicts (it never imports Session).

Format 2: ONE safetensors file. A state dict (nested dicts whose leaves are tensors or JSON values) is split
into its tensors, stored under their dotted paths (`cache.kv`, `cache.slots.positions`, `last_logits`), and a
JSON tree with the rest, stored in the string metadata under the key `halo` together with the format name and
version, the model identity, the config (sources as dicts) and a SHA-256 checksum per tensor (safetensors
checks the structure; the checksums catch flipped bytes in the data). Format 1 files (release 0.1.0, flat
tensor names and a flat JSON document) are still read, and turned into the same state dict.

Writing is atomic: the file is written to a temporary file in the destination folder, fsynced, and moved over
the destination with `os.replace`, so a crash leaves either the old file or the new one, never a half file.

Loading checks the model identity (type, layers, KV heads, head dim, vocab size, dtype, name and a fingerprint
of the first embedding rows) and raises ValueError naming the first mismatch; a truncated or corrupted file
raises ValueError too. Shapes and dtypes are checked by the `load_state_dict` that receives the state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .atomic import atomic_replace
from .cache import COUNTERS
from .config import HaloConfig, SourcePolicy

FORMAT = "halo-weave-session"
VERSION = 2
READABLE_VERSIONS = (1, 2)


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
    data.setdefault("word_units", False)  # saved before word units existed: continue as that session did
    data.setdefault("granularity", "token")  # saved before per-layer memory existed: one token set
    if "repair_margin" not in data:  # saved before the tuned repair targeting: repair as that session did
        data.update(repair_margin=0.0, repair_guidance="hard", repair_rerank=None)
    data.setdefault("recall_heads", "mean")  # saved before recall read heads apart: the head mean, as then
    data.setdefault("key_weight", 0.0)  # saved before key novelty: the cull ranked the basis alone, as then
    data.setdefault("key_refresh", 1)  # saved before key_refresh: novelty computed at every cull, as then
    data.setdefault("rope_positions", "text")  # saved before memory positions: text positions, as then
    data.setdefault("rope_gap", 0)  # saved before capped holes: memory positions were plain ranks
    if "sources" in data:
        data["sources"] = {name: SourcePolicy(**policy) for name, policy in data["sources"].items()}
    if "unit_sources" in data:
        data["unit_sources"] = tuple(data["unit_sources"])
    return HaloConfig(**data)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def split_tensors(state, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON tree with each tensor replaced by {"tensor": path}, {path: tensor}) of a nested state dict."""
    if isinstance(state, torch.Tensor):
        return {"tensor": prefix}, {prefix: state.detach().to("cpu").contiguous()}
    if isinstance(state, dict):
        tree, tensors = {}, {}
        for key, value in state.items():
            tree[key], inner = split_tensors(value, f"{prefix}.{key}" if prefix else str(key))
            tensors.update(inner)
        return tree, tensors
    return state, {}


def join_tensors(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of `split_tensors`; KeyError when a referenced tensor is missing."""
    if isinstance(tree, dict):
        if set(tree) == {"tensor"} and isinstance(tree["tensor"], str):
            return tensors[tree["tensor"]]
        return {key: join_tensors(value, tensors) for key, value in tree.items()}
    return tree


# --------------------------------------------------------------------- save
def save(path, state: dict, *, model, config: HaloConfig) -> Path:
    """Write a state dict to the single file `path` (atomically), with `model`'s identity and `config`."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save path {path} is a directory; give a file name (a session is one file)")
    tree, tensors = split_tensors(state)
    meta = {"format": FORMAT, "version": VERSION, "model": model_identity(model), "config": config_to_dict(config),
            "state": tree, "checksums": {name: _digest(t) for name, t in tensors.items()}}
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
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} has session format version {meta.get('version')}; this halo reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    sums = meta.get("checksums", {})
    if set(sums) != set(tensors):
        raise ValueError(f"{path}: tensor list {sorted(tensors)} does not match the recorded {sorted(sums)} (corrupted)")
    for name, tensor in tensors.items():
        if _digest(tensor) != sums[name]:
            raise ValueError(f"{path}: checksum mismatch in tensor {name!r} (the file is corrupted)")
    return meta, tensors


def state_from_v1(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The state dict a format-1 file (release 0.1.0) stands for."""
    counters = meta["counters"]
    slots = {name[len("slot."):]: t for name, t in tensors.items() if name.startswith("slot.")}
    cache = {"kv": tensors["kv"], "slots": slots,
             "counters": {name: int(counters[name]) for name in COUNTERS},
             "halo_seconds": float(meta["timings"]["halo_seconds"]), "policy": meta["policy"],
             "journal": {"entries": meta["journal"]}}
    session = {"pinned_tokens": int(counters["pinned_tokens"]), "model_seconds": float(meta["timings"]["model_seconds"]),
               "marker_ids": meta["marker_ids"], "diffs": meta["diffs"], "extra": meta.get("extra") or {}}
    state = {"cache": cache, "session": session}
    if "last_logits" in tensors:
        state["last_logits"] = tensors["last_logits"]
    return state


def load(path, model, *, check_name: bool = True) -> tuple[HaloConfig, dict]:
    """(config, state dict) saved at `path`, after checking that it belongs to `model`.

    Raises FileNotFoundError (no file) or ValueError (damaged file, another model, malformed metadata).
    """
    meta, tensors = read_file(path)
    try:
        check_identity(meta["model"], model, check_name=check_name)
        config = config_from_dict(meta["config"])
        state = state_from_v1(meta, tensors) if meta["version"] == 1 else join_tensors(meta["state"], tensors)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: session metadata is incomplete or malformed ({type(err).__name__}: {err})") from None
    return config, state
