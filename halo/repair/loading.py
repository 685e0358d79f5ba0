"""`load_repairer`: a repair spec ("self", or a masked LM's name or folder) to a ready backend, failing early.

Meant to run when a session starts, before anything is fed: every reason a masked LM cannot serve as the repair
model (not found offline, not a masked LM, no vocabulary bridge to the host) is a one-line `RepairModelError`
naming the model, and the hub is never contacted (`offline.py`).
"""

from __future__ import annotations

from .base import Repairer
from .errors import RepairModelError
from .masked_lm import MaskedLMRepairer
from .self_lm import SelfRepairer


def load_repairer(spec: str, model, tokenizer, *, device=None, repair_threshold: float = 64.0,
                  min_margin: float = 0.0, guidance: str = "hard", rerank_top: int | None = None) -> Repairer:
    """The repair backend `spec` names.

    Args:
        spec: "self" (the host model repairs itself) or a masked LM's local folder or cached hub name.
        model: the host causal LM (used by "self").
        tokenizer: the host tokenizer (kinds for "self", the vocabulary bridge for a masked LM).
        device: where a masked LM runs (default: where it loads, the CPU).
        repair_threshold: brightness below which window context counts as dim (`halo.repair.base`).
        min_margin, guidance: the gate and the guidance (`halo.repair.base`).
        rerank_top: right-context re-ranking of the self backend (`halo.repair.self_lm`); a masked LM reads both
            sides of its target anyway and ignores it.

    Returns:
        `SelfRepairer(model, tokenizer)` for "self", else a `MaskedLMRepairer` bridged to `tokenizer`.

    Raises:
        RepairModelError: spec is empty, or names a masked LM that is not found offline, is not a masked LM,
            or whose vocabulary has no bridge to `tokenizer` (one line: the model and why).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RepairModelError(str(spec), "the repair model must be 'self' or a masked LM's name or folder")
    if spec == "self":
        return SelfRepairer(model, tokenizer, rerank_top=rerank_top, guidance=guidance,
                            repair_threshold=repair_threshold, min_margin=min_margin)
    return MaskedLMRepairer(spec, host_tokenizer=tokenizer, device=device, guidance=guidance,
                            repair_threshold=repair_threshold, min_margin=min_margin)
