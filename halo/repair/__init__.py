"""Repair (Step 3d): dim-but-alive tokens near holes are re-predicted in one batched forward pass.

Public API:

* `Repairer` (base), `MaskedLMRepairer` (bridged masked LM, DistilBERT by default), `SelfRepairer` (the host
  causal LM): `repair(diffuser_input_list) -> [(global_cull_position, original_token_id_at_mask, new_token_id)]`
  and `repair_batch(RepairBatch)` for the dict-free fast path.
* `build_windows` (C++/CUDA operator `torch.ops.halo.build_windows` when `halo._C` is built, else
  `build_windows_reference`), `WindowBatch`, `windows_to_contract_dicts`.
* `RepairBatch`, `validate_contract_dicts`, `CONTRACT_KEYS`.
* `token_pieces`, `build_bridge`, `bridge_tokenizers`, `BridgeTable`.
* `GraphedRepairForward` (CUDA-graph replay of a repair forward, MLM or self; eager elsewhere).
* `TokenKind`, `token_kinds`, `candidate_mask`: per-host-id kinds that keep every suggestion boundary-true.
* `load_repairer(spec, model, tokenizer, *, device=None, repair_threshold=64.0)` and `RepairModelError` (a
  `ValueError` with a one-line message) for a repair model that cannot be used; nothing is downloaded.

Everything works without the compiled extension.
"""

from .base import Repairer, Suggestions
from .bridge import BridgeTable, TokenPieces, bridge_tokenizers, build_bridge, token_pieces
from .contract import CONTRACT_KEYS, RepairBatch, validate_contract_dicts
from .errors import RepairModelError
from .graphs import GraphedRepairForward
from .kinds import TokenKind, candidate_mask, token_kinds
from .loading import load_repairer
from .masked_lm import MaskedLMRepairer, masked_lm_head
from .self_lm import SelfRepairer
from .windows import (MAX_WINDOW, WindowBatch, build_windows, build_windows_reference, extension_available,
                      windows_to_contract_dicts)

__all__ = [
    "CONTRACT_KEYS", "MAX_WINDOW", "BridgeTable", "GraphedRepairForward", "MaskedLMRepairer", "RepairBatch",
    "RepairModelError", "Repairer", "SelfRepairer", "Suggestions", "TokenKind", "TokenPieces", "WindowBatch",
    "bridge_tokenizers", "build_bridge", "build_windows", "build_windows_reference", "candidate_mask",
    "extension_available", "load_repairer", "masked_lm_head", "token_kinds", "token_pieces",
    "validate_contract_dicts", "windows_to_contract_dicts",
]
