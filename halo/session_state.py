"""The saved state of a session: its own part of the state dict (SessionState), and a session from a file.

`Session.state_dict()` is `{"cache": HaloCache.state_dict(), "session": {...}, "last_logits": tensor}` (the
last key only when there are logits); `halo.persist` writes and reads it as it is. The "session" part holds what
the conductor adds to the memory: its counters, the applied diffs, the caller's extra dict, the word state and
the elision marker's token ids, by which a load checks that the tokenizer is the same. `load_session` turns a
file back into a session: read it (halo.persist), build the session with the saved config, restore its state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import persist
from .units import WordState

Diff = tuple[int, int, int]


@dataclass
class SessionState:
    """What a session saves besides its cache.

    Attributes:
        pinned_tokens: pinned tokens fed so far. model_seconds: time spent in the model's forwards.
        marker_ids: list[int] the elision marker's token ids.
        diffs: applied repairs (position, old_token_id, new_token_id).
        extra: the JSON-able dict given to `Session.save`.
        word_state: where the stream stands in a word, or None for a session without word units (saved as null;
            null or absent, as in files of format 1, reads back as WordState()).
        last_logits: float [V] logits of the last fed or generated token, or None.
    """

    pinned_tokens: int
    model_seconds: float
    marker_ids: list[int]
    diffs: list[Diff]
    extra: dict
    word_state: WordState | None = None
    last_logits: torch.Tensor | None = None

    @classmethod
    def of(cls, session) -> "SessionState":
        """The state of `session` (a Session) as it stands, read from its public attributes."""
        words = session.words
        return cls(session.pinned_tokens, session.model_seconds, list(session.markers.token_ids), session.diffs,
                   session.extra, None if words is None else words.state, session.last_logits)

    def state_dict(self, cache_state: dict) -> dict:
        """The session's state dict around `cache_state` (HaloCache.state_dict()); last logits go to the CPU."""
        own = {"pinned_tokens": self.pinned_tokens, "model_seconds": self.model_seconds,
               "marker_ids": list(self.marker_ids), "diffs": [list(map(int, d)) for d in self.diffs],
               "extra": dict(self.extra),
               "word_state": None if self.word_state is None else list(vars(self.word_state).values())}
        state = {"cache": cache_state, "session": own}
        if self.last_logits is not None:
            state["last_logits"] = self.last_logits.detach().to("cpu").contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: dict, marker_ids: list[int], vocab_size: int,
                        device: torch.device) -> "SessionState":
        """The session part of `state`, checked against the session it is loaded into; last logits on `device`.

        ValueError when `state` was saved with other elision marker tokens (another tokenizer) or with logits of
        another vocabulary size; KeyError/TypeError when it is incomplete or malformed.
        """
        own, logits = state["session"], state.get("last_logits")
        if list(marker_ids) != list(own["marker_ids"]):
            raise ValueError("saved session belongs to a different tokenizer: the elision marker tokenises to "
                             f"{own['marker_ids']} in the file but {marker_ids} now")
        if logits is not None and tuple(logits.shape) != (vocab_size,):
            raise ValueError(f"saved last logits have shape {tuple(logits.shape)}, expected ({vocab_size},)")
        return cls(int(own["pinned_tokens"]), float(own["model_seconds"]), list(own["marker_ids"]),
                   [tuple(int(x) for x in d) for d in own["diffs"]], dict(own.get("extra") or {}),
                   WordState(*(own.get("word_state") or ())), None if logits is None else logits.to(device))


def load_session(session_class, path, model, tokenizer, *, policy=None, check_name: bool = True):
    """The session saved at `path`: `session_class(model, tokenizer, config, policy=policy)` with the saved
    HaloConfig, its state restored by `load_state_dict`.

    Raises FileNotFoundError (no file) or ValueError (a damaged file, another model or tokenizer, another policy,
    a state that is incomplete or malformed). `check_name=False` accepts a model whose name_or_path changed.
    """
    config, state = persist.load(path, model, check_name=check_name)
    session = session_class(model, tokenizer, config, policy=policy)
    try:
        session.load_state_dict(state)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: session state is incomplete or malformed ({type(err).__name__}: {err})") from None
    return session
