"""Journal: the append-only record of every evicted token. The model forgets; the system loses nothing.

Evictions are recorded as device tensors (no host synchronisation in the decode loop) and turned into Python
entries only when someone reads them. An optional JSONL sink gets every entry as soon as it is recorded, in
whole lines (one `os.write` per batch on an O_APPEND descriptor), so a killed process leaves a file that parses
and holds every eviction up to the kill.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

KINDS = ("evicted", "replaced", "recalled")
"""Journal entry kinds: a culled token, the old token of an applied repair diff, and a token put back by recall
(halo.recall): with recall on, tokens remembered + evicted - recalled = fed (markers aside)."""


@dataclass(frozen=True)
class JournalEntry:
    """One forgotten token: its absolute position, token id, source name, final brightness and the step it died.

    `kind` is "evicted" for a culled token, "replaced" for the old token of an applied repair diff (the
    position stays retained with the new token), and "recalled" for an evicted token put back by recall (its
    brightness is the one it came back with).
    """

    position: int
    token_id: int
    source: str
    brightness: float
    step: int
    kind: str = "evicted"


class Journal:
    """Append-only list of JournalEntry, fed with device tensors.

    Args:
        source_names: source code -> name, to label entries.
        skip_source: a source code whose evictions are not fed text (elision markers) and are left out.
    """

    def __init__(self, source_names: list[str], skip_source: int | None = None):
        self.source_names = list(source_names)
        self.skip_source = skip_source
        self._sink = None
        self.clear()

    def clear(self) -> None:
        """Drop every entry (the sink file, if any, keeps what was written)."""
        self._entries: list[JournalEntry] = []
        self._by_kind: dict[str, list[JournalEntry]] = {kind: [] for kind in KINDS}
        self._pending: list[tuple] = []

    def record(self, positions: torch.Tensor, token_ids: torch.Tensor, sources: torch.Tensor, brightness: torch.Tensor,
               step: int, kind: str = "evicted") -> None:
        """Queue evicted (or replaced) slots as equal-length 1-D tensors on any device; copies them."""
        if kind not in KINDS:
            raise ValueError(f"journal entry kind must be one of {KINDS}, got {kind!r}")
        if positions.numel():
            self._pending.append((positions.clone(), token_ids.clone(), sources.clone(), brightness.clone(), step, kind))
        if self._sink is not None:
            self._flush_pending()

    def open_sink(self, path) -> None:
        """Append every entry (past and future) to a JSONL file as it is recorded."""
        self._flush_pending()
        self.close()
        self._sink = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._write(self._entries)

    def close(self) -> None:
        if self._sink is not None:
            os.close(self._sink)
            self._sink = None

    def _write(self, entries: list[JournalEntry]) -> None:
        payload = "".join(json.dumps(asdict(entry)) + "\n" for entry in entries).encode("utf-8")
        while payload:
            payload = payload[os.write(self._sink, payload):]

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        start = len(self._entries)
        for positions, token_ids, sources, brightness, step, kind in pending:
            rows = zip(positions.tolist(), token_ids.tolist(), sources.tolist(), brightness.tolist())
            for position, token_id, source, bright in rows:
                if source == self.skip_source:
                    continue
                entry = JournalEntry(int(position), int(token_id), self.source_names[int(source)], float(bright),
                                     int(step), kind)
                self._entries.append(entry)
                self._by_kind[kind].append(entry)
        if self._sink is not None:
            self._write(self._entries[start:])

    @property
    def entries(self) -> list[JournalEntry]:
        """All entries in the order they happened (materialises pending device records)."""
        self._flush_pending()
        return self._entries

    @property
    def evicted(self) -> list[JournalEntry]:
        """Entries of culled tokens only (each fed position appears here or in the cache, exactly once; with recall,
        a position evicted again after a recall appears once per eviction, and once per recall under "recalled").

        Kept as it grows: reading it costs only the materialisation of what was recorded since the last read.
        """
        self._flush_pending()
        return self._by_kind["evicted"]

    def count(self, kind: str = "evicted") -> int:
        """Number of entries of `kind` so far: a running total (amortised O(1) per recorded token)."""
        self._flush_pending()
        return len(self._by_kind[kind])

    def state_dict(self) -> dict:
        """JSON-able state: `entries` as [position, token_id, source, brightness, step, kind] rows."""
        return {"entries": [[e.position, e.token_id, e.source, e.brightness, e.step, e.kind] for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the entries by those of `state_dict()` output; ValueError on an unknown source or kind."""
        entries = []
        for position, token_id, source, bright, step, *rest in state["entries"]:
            kind = str(rest[0]) if rest else "evicted"  # files written before kinds were saved
            if source not in self.source_names:
                raise ValueError(f"journal entry names unknown source {source!r}")
            if kind not in KINDS:
                raise ValueError(f"journal entry has unknown kind {kind!r}")
            entries.append(JournalEntry(int(position), int(token_id), str(source), float(bright), int(step), kind))
        self.clear()
        self._entries.extend(entries)
        for entry in entries:
            self._by_kind[entry.kind].append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, index):
        return self.entries[index]
