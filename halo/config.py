"""Configuration of the Halo Weave engine: budget, protected set, brightness dynamics per source, cull bias."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourcePolicy:
    """How tokens of one source live.

    Attributes:
        initial: brightness a newborn token of this source starts with, in [0, 255].
        decay: brightness lost per query row that sees the token, >= 0.
        pinned: pinned tokens never decay and are never culled (e.g. the system prompt).
        priority: cull priority, in brightness units, added to the cull score of this source's tokens (HaloPolicy);
            brightness itself is untouched. Under budget pressure a token outlives one of a source `d` lower in
            priority unless that one's score (brightness plus dark bias) is more than `d` higher; a difference of
            `(1 + dark_bias) * 255` or more is a strict order. `cull_threshold` reads brightness, not priority.
    """

    initial: float = 255.0
    decay: float = 1.0
    pinned: bool = False
    priority: float = 0.0

    def __post_init__(self):
        if not (0.0 <= float(self.initial) <= 255.0) or math.isnan(self.initial):
            raise ValueError(f"SourcePolicy.initial must be in [0, 255], got {self.initial}")
        if not (float(self.decay) >= 0.0) or math.isinf(self.decay):
            raise ValueError(f"SourcePolicy.decay must be finite and >= 0, got {self.decay}")
        if not math.isfinite(float(self.priority)):
            raise ValueError(f"SourcePolicy.priority must be finite, got {self.priority}")


def default_sources() -> dict[str, SourcePolicy]:
    """Default per-source policies.

    Conversation text (user, assistant) is born at mid brightness (128) and fades by half a unit per row that sees
    it unless the model keeps attending to it (uniform attention adds alpha * 1.0 per row; 0.5 rather than 1.0 since
    memory became per layer: tuned on development essays, where it cut perplexity under budget by 3-4%, and checked
    on the conversation suite). Born below the 255 ceiling, a
    token's brightness keeps the history of attention it earned instead of clamping (tuned on dev essays: at a
    budget of 1/8 of the text this beats the sinks + recent window rule; born at 255 it did not). Tool and log
    output is born dimmer and fades faster: it is usually read once. The system prompt is pinned. `marker` is the source of elision
    markers that stand for culled log/tool lines; they fade slowly, so a marker usually outlives the lines
    around it (it is a few tokens standing for many).

    Cull priorities (added to the cull score, never to brightness; tuned on generated conversations of seeds 1
    and 2, `halo eval --suite conversation`): during a flood of tool output nothing attends to the conversation,
    so everything said before it fades to 0 alike; the priority decides what goes first then. The user's words
    (+320) outlive tool and log output unless a line scores 320 higher (brightness above ~213 in an equally bright
    region: output the model keeps reading), and outlive the assistant's words (+64) unless those score 256
    higher; the assistant's words outlive tool output of similar brightness. Sources without a priority (tool,
    log, marker, any new one) score by brightness alone. Essays fed as one source are not changed by it.
    """
    return {
        "system": SourcePolicy(initial=255.0, decay=0.0, pinned=True),
        "user": SourcePolicy(initial=128.0, decay=0.5, priority=320.0),
        "assistant": SourcePolicy(initial=128.0, decay=0.5, priority=64.0),
        "tool": SourcePolicy(initial=112.0, decay=2.0),
        "log": SourcePolicy(initial=96.0, decay=2.0),
        "marker": SourcePolicy(initial=96.0, decay=0.5),
    }


ROPE_POSITIONS = ("auto", "text", "memory")
"""HaloConfig.rope_positions values: RoPE sees the text positions, or the ranks in the remembered memory, or
("auto") the ranks when recall is on and the model's RoPE allows them, else the text positions."""
GRANULARITIES = ("token", "layer", "head")
"""HaloConfig.granularity values: one retained token set for all layers, one per layer, or one per KV head."""
REPAIR_GUIDANCE = ("hard", "soft", "none")
"""HaloConfig.repair_guidance values: what a repair model sees of dim window context (`halo.repair.base`)."""
RECALL_HEADS = ("mean", "group", "each")
"""HaloConfig.recall_heads values: how recall reads a hit from the attention heads (`halo.archive_mass`)."""


@dataclass
class HaloConfig:
    """Everything that shapes what the cache keeps.

    Attributes:
        budget: retained tokens after every forward (the KV cache size in the steady state).
        sink_tokens: the first tokens of the stream (attention sinks), always protected.
        recent_tokens: grace window: the most recent tokens by position are always protected.
        chunk_size: most tokens fed in one forward; the K/V buffers hold `budget + chunk_size` slots.
        alpha: gain on normalised attention (uniform attention over the visible slots reads 1.0 per row).
        sources: source name -> SourcePolicy. Add or replace entries freely; `marker` must exist.
        unit_sources: sources whose text is split into line units (culled whole, replaced by markers).
        word_units: split the text of every other source into words (whitespace-delimited runs of tokens, at most
            24), each culled whole, so a number, name or URL is kept entire or not at all (halo.units).
        dark_bias: lambda in the cull score `b + lambda * mean(b of the +-dark_radius neighbours)`: a token
            whose neighbourhood is also dim goes first.
        dark_radius: neighbourhood half-width, in retained tokens in position order.
        cull_threshold: None culls only under budget pressure; a number makes unprotected tokens whose
            brightness falls to it die of neglect even under budget.
        marker_text: text of an elision marker; it replaces whole lines, so it ends with a newline.
        granularity: "token" keeps one set of retained tokens for every layer (brightness fed by the attention
            averaged over layers); "layer" gives every layer its own brightness and its own `budget` slots, fed
            by that layer's attention alone (halo.layered_cache): a token is remembered while any layer holds it;
            "head" gives every KV head of every layer its own (halo.head_cache), fed by its query heads alone.
        kernels: "auto" uses the fused Triton kernels on CUDA, and on CPU the PyTorch path with the compiled decode
            column mass of halo._C (halo.decode_mass; the plain PyTorch path where it is not built);
            "reference" forces the plain PyTorch path everywhere; "triton" forces the kernels (on CPU only under
            TRITON_INTERPRET=1, for tests). Chosen once, when the cache is built (halo.backend).
        repair: None (off), "self" (the host model re-predicts targets from their left context) or a masked-LM
            name or folder (e.g. "distilbert-base-uncased", bridged to the host vocabulary).
        repair_threshold: tokens dimmer than this (and brighter than the tokens just culled) may be repaired.
        repair_radius: only tokens within this many positions of a token culled in the same step are targets.
        repairs_per_step: most targets per step, nearest to the new holes first.
        repair_window: retained tokens per repair window (at most 511), centred on the target.
        repair_margin: the confidence gate: a suggestion replaces the current token only when the repair model
            scores it at least this much above the current token (a difference of logits, i.e. of log
            probabilities for the self backend: 2.0 asks for a suggestion e^2 = 7.4 times as likely).
        repair_guidance: "hard" hides window context dimmer than `repair_threshold` from the repair model,
            "soft" scales its input embeddings by brightness / 255, "none" shows the window as it is.
        repair_rerank: None, or c >= 2: the self backend scores the current token and its c - 1 nearest
            neighbours by their left and right context in one forward instead of reading the left context only
            (`halo.repair.self_lm`); a masked LM reads both sides of its target anyway and ignores it.
            The repair defaults (threshold 128, margin 2.0, guidance "none", re-ranking 8) are the setting that
            mended the memory's coherence at no perplexity cost on development essays (README, Repair).
        repair_overlap: True runs each step's repair one step behind decoding (on CUDA on a side stream, so
            it overlaps the next decode step; its diffs are applied at the boundary after that step, and
            diffs whose target died or changed meanwhile are dropped); False applies each step's diffs to the
            mirror at once and folds their K/V into the next forward; None (default) is True on CUDA.
        recall: bring evicted text back when the conversation needs it (halo.recall; per-layer or per-head memory). The
            keys of evicted tokens at the retrieval layers go into an archive; the query rows of every stream
            forward of a `recall_sources` source score it, and whole units that would out-shine the retained tokens
            (`recall_threshold`) are recomputed at their positions and put back.
        recall_layers: retrieval layers as fractions of the depth (0 the first layer, 1 the last).
        recall_capacity: archived tokens per retrieval layer (per KV head of it with per-head memory; the oldest are
            overwritten).
        recall_sources: sources whose stream forwards score the archive (add "assistant" and set
            `recall_min_rows` 1 to score every decode step: one host read per step).
        recall_min_rows: a forward scores the archive only with at least this many query rows. One row is one
            sample of the attention: streamed token by token, prose recalled something after 8 tokens in 10 and
            lost perplexity (README, Recall); a message, a tool result or a question arrives as many rows.
        recall_threshold: a unit is recalled when its best token's archive mass in a forward reaches this times the
            bar: the 75th percentile of the mass the retained tokens drew in the same forward (retrieval layers),
            both read at the same pool of heads (`recall_heads`).
        recall_discount, recall_history: what a token usually draws does not make it a hit. Every archived token
            keeps the mean of its scores over the forwards that scored it since it was archived; once there are
            `recall_history` of them, a forward scores it by its ratio over the bar less `recall_discount` times
            that mean. Some tokens draw mass from every query (a word whose key looks like a sink's: traced on the
            held-out text, `assert` far from the sinks `The "assert"` outscored the asked fact and its sentence
            filled the recall; README, Recall). 0 turns it off.
        recall_heads: how heads read a hit: "mean" (the head-mean mass against the head-mean bar, as brightness
            pools heads), "group" (default: each head's mass against its own bar, averaged over each KV head's
            query group; the best group counts) or "each" (the best single head). A few heads retrieve; the
            mean over all heads drowns them (README, Recall).
        recall_held_reads: a token some rows hold and others lack is a hit too when the rows that hold it read it
            now: the mass its held copies draw in the scoring forward over the same bar, less `recall_discount`
            times what they usually draw there, once `recall_history` forwards have scored them (before that, no
            hit). It then comes back whole. Per KV head the heads that read a fact hold it, and the heads that lack
            it would not have read it, so their archived copies never reach the bar; the model still needs it whole
            (README, Recall). None (default): on per KV head, off per layer (measured: it cost per-layer memory
            planted keys).
        recall_tokens: most tokens recalled per forward (hit units first, then the rest of their sentences, then
            their neighbours).
        recall_context: dead units within this many positions of a hit come back with it once every hit's
            sentence has (room left).
        recall_grace: recalled tokens are protected from the cull for this many fed positions.
        rope_positions: "text" (DESIGN.md): RoPE sees each token's position in the text; "memory": RoPE sees its
            rank among the remembered tokens, so the holes the cull leaves close (halo.memory_positions; models with
            a rotary embedding over the whole head only). "auto" (default): "memory" with recall on a model that
            allows it (recall puts text back into a memory with holes; measured: README, Memory positions), else
            "text", so without recall the cache keeps DESIGN.md's positions.
        rope_gap: with memory positions, the most RoPE positions one hole in the memory counts (int >= 0): a
            token's position is the sum of the remembered tokens and the capped holes before it; 0: its rank among
            the remembered tokens. Default 4: within 1% of text positions' perplexity on every text measured, where
            ranks cost 2% on the embedded text, with as many conversations answered (README, Capped holes).
        value_weight: p >= 0. With p > 0 (per-layer or per-head memory) a slot's attention income at a layer is
            weighed by `|v| ** p` over its mean over the layer's held slots, |v| its value vector's norm (mean over
            KV heads; per KV head, that head's own and its own held slots): what the rows actually read from it,
            not only how much they looked. 0 (default): the
            attention alone, DESIGN.md's rule (README, Brightness).
        key_weight: k >= 0. With k > 0 each slot's cull basis (brightness, or a policy's own such as the mean
            income) is multiplied by `exp(k * novelty)`, novelty how much less its key points along the common
            direction of its (layer, KV head)'s held keys than theirs do on average (halo.key_novelty): a key
            unlike the others is one a later query may match where nothing else can. Default 3 (chosen on
            development essays; README, Key novelty); 0: the basis alone, DESIGN.md's order.
        key_refresh: fed rows between key novelty refreshes (int >= 1). A cull after a forward that crosses a
            multiple of `key_refresh` fed rows (every chunk of a feed, every `key_refresh`-th decode step) computes
            every held key's novelty afresh; the others reuse the novelty of the last refresh, kept with each slot
            (a slot written since counts 0; the recent window protects it meanwhile). Default 1: every cull, as
            README's tables measured; 4 saves about 2 ms of a SmolLM2 decode step at budget 512 on 2 CPU cores, at
            a measured cost in perplexity at 1/8 (README, Key novelty).
    """

    budget: int = 512
    sink_tokens: int = 4
    recent_tokens: int = 64
    chunk_size: int = 64
    alpha: float = 1.0
    sources: dict[str, SourcePolicy] = field(default_factory=default_sources)
    unit_sources: tuple[str, ...] = ("log", "tool")
    word_units: bool = True
    dark_bias: float = 0.5
    dark_radius: int = 4
    cull_threshold: float | None = None
    marker_text: str = "[...]\n"
    granularity: str = "layer"
    kernels: str = "auto"
    repair: str | None = None
    repair_threshold: float = 128.0
    repair_radius: int = 8
    repairs_per_step: int = 4
    repair_window: int = 511
    repair_margin: float = 2.0
    repair_guidance: str = "none"
    repair_rerank: int | None = 8
    repair_overlap: bool | None = None
    recall: bool = False
    recall_layers: tuple[float, ...] = (0.5, 0.75)
    recall_capacity: int = 16384
    recall_sources: tuple[str, ...] = ("user", "tool")
    recall_min_rows: int = 4
    recall_threshold: float = 3.0
    recall_discount: float = 1.0
    recall_history: int = 4
    recall_heads: str = "group"
    recall_held_reads: bool | None = None
    recall_tokens: int = 32
    recall_context: int = 8
    recall_grace: int = 64
    rope_positions: str = "auto"
    rope_gap: int = 4
    value_weight: float = 0.0
    key_weight: float = 3.0
    key_refresh: int = 1

    def __post_init__(self):
        self.sources = dict(self.sources)
        self.unit_sources = tuple(self.unit_sources)
        self.recall_layers = tuple(self.recall_layers)
        self.recall_sources = tuple(self.recall_sources)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        for name in ("budget", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("sink_tokens", "recent_tokens", "dark_radius", "repair_radius", "repairs_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        protected = self.sink_tokens + self.recent_tokens
        if self.budget <= protected:
            raise ValueError(
                f"budget ({self.budget}) must be larger than the protected set: sink_tokens ({self.sink_tokens}) "
                f"+ recent_tokens ({self.recent_tokens}) = {protected}"
            )
        for name in ("alpha", "dark_bias", "value_weight", "key_weight"):
            value = getattr(self, name)
            if not (value >= 0) or math.isinf(value):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not (isinstance(self.key_refresh, int) and not isinstance(self.key_refresh, bool) and self.key_refresh >= 1):
            raise ValueError(f"key_refresh must be an int >= 1, got {self.key_refresh!r}")
        if self.cull_threshold is not None and not (0.0 <= self.cull_threshold < 255.0):
            raise ValueError(f"cull_threshold must be None or in [0, 255), got {self.cull_threshold!r}")
        if not (isinstance(self.repair_window, int) and 1 <= self.repair_window <= 511):
            raise ValueError(f"repair_window must be an int in [1, 511], got {self.repair_window!r}")
        if self.repair is not None and (not isinstance(self.repair, str) or not self.repair):
            raise ValueError(f"repair must be None, 'self' or a masked-LM name or path, got {self.repair!r}")
        if self.repair_overlap not in (None, True, False):
            raise ValueError(f"repair_overlap must be None, True or False, got {self.repair_overlap!r}")
        if not (0.0 <= self.repair_threshold <= 255.0):
            raise ValueError(f"repair_threshold must be in [0, 255], got {self.repair_threshold!r}")
        if not (self.repair_margin >= 0.0) or math.isinf(self.repair_margin):
            raise ValueError(f"repair_margin must be finite and >= 0, got {self.repair_margin!r}")
        if self.repair_guidance not in REPAIR_GUIDANCE:
            raise ValueError(f"repair_guidance must be one of {REPAIR_GUIDANCE}, got {self.repair_guidance!r}")
        rerank = self.repair_rerank
        if rerank is not None:
            if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 2:
                raise ValueError(f"repair_rerank must be None or an int >= 2, got {self.repair_rerank!r}")
        for name, policy in self.sources.items():
            if not isinstance(policy, SourcePolicy):
                raise ValueError(f"sources[{name!r}] must be a SourcePolicy, got {type(policy).__name__}")
        if "marker" not in self.sources:
            raise ValueError("sources must define 'marker' (the source of elision markers)")
        for name in self.unit_sources:
            if name not in self.sources:
                raise ValueError(f"unit_sources names {name!r}, which is not in sources ({sorted(self.sources)})")
        if not self.marker_text:
            raise ValueError("marker_text must not be empty")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.value_weight and self.granularity == "token":
            raise ValueError("value_weight needs per-layer or per-head memory (granularity='layer' or 'head'); the "
                             "token-level cache reads attention alone")
        self._validate_recall()
        if self.rope_positions not in ROPE_POSITIONS:
            raise ValueError(f"rope_positions must be one of {ROPE_POSITIONS}, got {self.rope_positions!r}")
        if isinstance(self.rope_gap, bool) or not isinstance(self.rope_gap, int) or self.rope_gap < 0:
            raise ValueError(f"rope_gap must be an int >= 0, got {self.rope_gap!r}")
        if self.kernels not in ("auto", "reference", "triton"):
            raise ValueError(f"kernels must be 'auto', 'reference' or 'triton', got {self.kernels!r}")

    def _validate_recall(self) -> None:
        if self.recall not in (True, False):
            raise ValueError(f"recall must be True or False, got {self.recall!r}")
        if not self.recall:
            return
        if self.granularity == "token":
            raise ValueError("recall needs per-layer or per-head memory (granularity='layer' or 'head'), not one "
                             "token set for all layers")
        if not self.recall_layers or any(not (0.0 <= f <= 1.0) for f in self.recall_layers):
            raise ValueError(f"recall_layers must be fractions of the depth in [0, 1], got {self.recall_layers!r}")
        for name in ("recall_capacity", "recall_tokens", "recall_min_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("recall_context", "recall_grace", "recall_history"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.recall_held_reads not in (True, False, None):
            raise ValueError(f"recall_held_reads must be True, False or None, got {self.recall_held_reads!r}")
        if self.recall_heads not in RECALL_HEADS:
            raise ValueError(f"recall_heads must be one of {RECALL_HEADS}, got {self.recall_heads!r}")
        for name in ("recall_threshold", "recall_discount"):
            value = getattr(self, name)
            if not (value >= 0) or math.isinf(value):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        room = self.budget - self.sink_tokens - self.recent_tokens
        if self.recall_tokens >= room:
            raise ValueError(f"recall_tokens ({self.recall_tokens}) must be below budget - sink_tokens - "
                             f"recent_tokens ({room}): recalled tokens are protected for a grace period")
        for name in self.recall_sources:
            if name not in self.sources:
                raise ValueError(f"recall_sources names {name!r}, which is not in sources ({sorted(self.sources)})")

    @property
    def held_reads(self) -> bool:
        """Whether recall scores held copies of partly held tokens (`recall_held_reads`; None: per KV head only)."""
        return self.granularity == "head" if self.recall_held_reads is None else bool(self.recall_held_reads)

    def recall_layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The retrieval layers (sorted, distinct) of a model with `num_layers` layers: recall_layers are fractions
        of the depth (0 the first layer, 1 the last)."""
        return tuple(sorted({min(num_layers - 1, round(f * (num_layers - 1))) for f in self.recall_layers}))

    def replace(self, **changes) -> "HaloConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def source_names(self) -> list[str]:
        """Source names in code order (the code of a source is its index here)."""
        return list(self.sources)

    def source_code(self, name: str) -> int:
        """Integer code stored per slot for a source name; unknown names raise ValueError."""
        try:
            return self.source_names.index(name)
        except ValueError:
            raise ValueError(f"unknown source {name!r}; known sources: {', '.join(self.source_names)}") from None

    def source_priorities(self) -> tuple[float, ...]:
        """Each source's cull priority (SourcePolicy.priority), indexed by source code."""
        return tuple(float(policy.priority) for policy in self.sources.values())

    def line_source_codes(self) -> tuple[int, ...]:
        """The source codes of `unit_sources` (text split into line units)."""
        return tuple(self.source_code(name) for name in self.unit_sources)
