"""Loading a masked LM for repair from local files only (a folder, or the Hugging Face cache).

The hub is never contacted: every load passes `local_files_only=True` and runs with the hub client in offline
mode (`offline_hub`: without it, building request headers still fetches a registry from the hub, up to a 3 s
timeout, even for local files). A missing model fails at once instead of hanging or surfacing the hub client's
`OSError`; every failure is a one-line `RepairModelError`:

* `require_masked_lm(name)`: the config is found offline and describes a masked LM (its model type has an
  `AutoModelForMaskedLM` class, and its saved architectures, if any, carry a masked-LM head);
* `load_mlm_tokenizer(name)`: the tokenizer loads offline and has a mask token;
* `load_mlm_model(name)`: the weights load offline into `AutoModelForMaskedLM`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import RepairModelError, first_line

NOT_FOUND = "not found offline (no such local folder, and not in the Hugging Face cache; the hub is not contacted)"
_MLM_HEADS = ("ForMaskedLM", "ForPreTraining")  # saved architectures whose weights hold a masked-LM head


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Runs the block with the hub client in offline mode (`HF_HUB_OFFLINE`), restoring the previous mode after."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def require_masked_lm(name: str):
    """The model's config, after checking that it is found offline and is a masked LM (RepairModelError if not)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        with offline_hub():
            config = AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        raise RepairModelError(name, NOT_FOUND) from None
    except Exception as err:  # noqa: BLE001 - any unreadable config is reported in one line
        raise RepairModelError(name, f"its config cannot be read ({first_line(err)})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    described = ", ".join(architectures) or config.model_type
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise RepairModelError(name, f"not a masked LM ({described})")
    if architectures and not any(head in arch for arch in architectures for head in _MLM_HEADS):
        raise RepairModelError(name, f"not a masked LM ({described} has no masked-LM head)")
    return config


def load_mlm_tokenizer(name: str):
    """The masked LM's tokenizer, loaded offline; it must have a mask token (RepairModelError if not)."""
    from transformers import AutoTokenizer

    try:
        with offline_hub():
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - the hub client raises OSError, ValueError, ...
        raise RepairModelError(name, f"its tokenizer cannot be loaded offline ({first_line(err)})") from None
    if tokenizer.mask_token_id is None:
        raise RepairModelError(name, "not a masked LM (its tokenizer has no mask token)")
    return tokenizer


def load_mlm_model(name: str):
    """The `AutoModelForMaskedLM` loaded offline (RepairModelError when its weights cannot be)."""
    from transformers import AutoModelForMaskedLM

    try:
        with offline_hub():
            return AutoModelForMaskedLM.from_pretrained(name, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise RepairModelError(name, f"its weights cannot be loaded offline ({first_line(err)})") from None
