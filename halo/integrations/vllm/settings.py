"""Halo settings of a vLLM engine and of each request: a HaloConfig plus what serving adds.

An engine is switched on by a JSON object of HaloConfig fields, given either as
`LLM(..., additional_config={"halo": {...}})` (or `--additional-config '{"halo": {...}}'`) or in the environment
variable `HALO_VLLM_CONFIG`; additional_config wins when both are set. Besides HaloConfig's fields the object
may hold the serving keys of `ServingConfig` (`prompt_source`, `output_source`, `journal_dir`). `sources` maps a
source name to an object of SourcePolicy fields and replaces the default table, as in HaloConfig.

Per request, `SamplingParams(extra_args={"halo": False})` serves that request plainly, and
`extra_args={"halo": {"budget": 128, ...}}` overrides fields of the engine's settings for it. Requests on an
engine started without Halo settings are served plainly whatever their extra_args say.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from halo.config import HaloConfig, SourcePolicy

ENV_VAR = "HALO_VLLM_CONFIG"
CONFIG_KEY = "halo"
SERVING_KEYS = ("prompt_source", "output_source", "journal_dir")
_HALO_FIELDS = {f.name for f in dataclasses.fields(HaloConfig)}
_DEFAULT = HaloConfig()


@dataclass(frozen=True)
class ServingConfig:
    """What Halo keeps for one request served by vLLM.

    Attributes:
        halo: the HaloConfig. Read: budget, sink_tokens, recent_tokens, alpha, sources, dark_bias, dark_radius,
            granularity, unit_sources and word_units (words and lines, request_units), kernels ("auto" or
            "reference"). Not read: chunk_size (vLLM's scheduler chunks prefill: max_num_batched_tokens) and
            the repair_* tuning fields while repair is off. Refused (`check_servable`): repair, cull_threshold,
            recall, rope_positions="memory", kernels="triton", value_weight, key_weight (`parse` sets it to 0
            unless given), granularity="head" and a marker_text of its own (no elision marker is written inside
            vLLM).
        prompt_source: source name of prompt tokens (its SourcePolicy sets their initial brightness, decay and
            cull priority).
        output_source: source name of generated tokens.
        journal_dir: when set, each request's journal is appended as JSONL to `<journal_dir>/<request id>.jsonl`
            as tokens are evicted (halo.journal's sink), in the worker process.
    """

    halo: HaloConfig
    prompt_source: str = "user"
    output_source: str = "assistant"
    journal_dir: str | None = None

    @property
    def budget(self) -> int:
        return self.halo.budget


def check_servable(serving: ServingConfig) -> ServingConfig:
    """Raise ValueError naming the first setting the vLLM integration cannot honour; return `serving`."""
    cfg = serving.halo
    if cfg.repair is not None:
        raise ValueError("halo repair re-runs the model on retained windows and is not available inside vLLM; "
                         "set repair to null")
    if cfg.cull_threshold is not None:
        raise ValueError("cull_threshold lets layers hold different counts, but one vLLM block table serves every "
                         "layer of a request; set cull_threshold to null")
    if cfg.recall:
        raise ValueError("halo recall re-runs the model on archived text and is not available inside vLLM; set "
                         "recall to false")
    if cfg.rope_positions == "memory":
        raise ValueError("vLLM computes RoPE from each request's token count, so rope_positions='memory' "
                         "(ranks in the remembered memory) is not available inside vLLM; use 'text' or 'auto'")
    if cfg.marker_text != _DEFAULT.marker_text:
        raise ValueError("elision markers are not written inside vLLM (a culled line leaves no marker), so "
                         "marker_text cannot be honoured; leave it at its default")
    if cfg.kernels == "triton":
        raise ValueError('kernels="triton" needs CUDA; the vLLM integration runs on the CPU attention backend '
                         '(use "auto" or "reference")')
    if cfg.granularity == "head":
        raise ValueError("granularity 'head' gives every KV head its own slots, but one vLLM block table serves "
                         "every head of a request; use 'layer' or 'token'")
    if cfg.value_weight:
        raise ValueError("value_weight (income weighed by value norms) is not read inside vLLM, whose column mass "
                         "sees the paged keys only; leave it at 0")
    if cfg.key_weight:
        raise ValueError("key_weight (key novelty) reads Halo's own K/V buffers, which vLLM's paged cache replaces; "
                         "leave it at 0")
    for key in ("prompt_source", "output_source"):
        name = getattr(serving, key)
        policy = cfg.sources.get(name)
        if policy is None:
            raise ValueError(f"{key} {name!r} is not a source of the HaloConfig ({', '.join(cfg.sources)})")
        if policy.pinned:
            raise ValueError(f"{key} {name!r} is pinned; pinned text can outgrow the budget, so the vLLM "
                             "integration only serves unpinned prompt and output sources")
    if serving.journal_dir is not None and not isinstance(serving.journal_dir, str):
        raise ValueError(f"journal_dir must be a string path or null, got {serving.journal_dir!r}")
    return serving


def parse(spec) -> ServingConfig:
    """ServingConfig from a dict or a JSON string of HaloConfig fields and serving keys.

    Raises ValueError on bad JSON, unknown keys or values HaloConfig rejects.
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"Halo settings are not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"Halo settings must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _HALO_FIELDS - set(SERVING_KEYS))
    if unknown:
        raise ValueError(f"unknown Halo setting(s) {unknown}; HaloConfig fields are {sorted(_HALO_FIELDS)} and "
                         f"serving keys are {list(SERVING_KEYS)}")
    fields = {k: v for k, v in spec.items() if k in _HALO_FIELDS}
    fields.setdefault("key_weight", 0.0)  # key novelty reads Halo's own K/V buffers: off here unless asked (refused)
    if "sources" in fields:
        fields["sources"] = _sources(fields["sources"])
    if "unit_sources" in fields:
        fields["unit_sources"] = tuple(fields["unit_sources"])
    serving = {k: v for k, v in spec.items() if k in SERVING_KEYS}
    return check_servable(ServingConfig(HaloConfig(**fields), **serving))


def _sources(table) -> dict[str, SourcePolicy]:
    if not isinstance(table, dict):
        raise ValueError(f"sources must be an object of name -> SourcePolicy fields, got {table!r}")
    out = {}
    for name, policy in table.items():
        if isinstance(policy, SourcePolicy):
            out[name] = policy
        elif isinstance(policy, dict):
            out[name] = SourcePolicy(**policy)
        else:
            raise ValueError(f"sources[{name!r}] must be an object of SourcePolicy fields, got {policy!r}")
    return out


def to_dict(serving: ServingConfig) -> dict:
    """The JSON-able dict `parse` reads back into an equal ServingConfig."""
    out = dataclasses.asdict(serving.halo)
    out["unit_sources"] = list(out["unit_sources"])
    for key in SERVING_KEYS:
        out[key] = getattr(serving, key)
    return out


def engine_settings(vllm_config) -> ServingConfig | None:
    """The engine's settings from `vllm_config.additional_config["halo"]` or `$HALO_VLLM_CONFIG`, or None (off)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict):
        extra = {}
    spec = extra.get(CONFIG_KEY)
    if spec is None:
        spec = os.environ.get(ENV_VAR) or None
    if spec is None or spec is False:
        return None
    return parse(spec)


def request_settings(engine: ServingConfig | None, sampling_params) -> ServingConfig | None:
    """One request's settings: the engine's, overridden by `sampling_params.extra_args["halo"]`; None = plain.

    Raises ValueError on an override that is neither false, true, null nor an object of settings.
    """
    if engine is None or sampling_params is None:
        return None
    extra = getattr(sampling_params, "extra_args", None) or {}
    override = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if override is None or override is True:
        return engine
    if override is False:
        return None
    if not isinstance(override, dict):
        raise ValueError(f'extra_args["halo"] must be false, true or an object of Halo settings, got {override!r}')
    return parse({**to_dict(engine), **override})
