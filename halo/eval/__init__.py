"""Evaluation of cull policies on the same HaloCache: perplexity under budget, planted-fact recall, per-step cost."""

from .plant import FACT_TEMPLATE, QUESTION, Planted, fact_text, make_key, plant_fact, recalled
from .runner import (RECORD_KEYS, StreamResult, eval_config, evaluate, format_table, parse_budget, perplexity, plot,
                     recall_probe, stream_nll)

__all__ = [
    "FACT_TEMPLATE", "QUESTION", "Planted", "RECORD_KEYS", "StreamResult", "eval_config", "evaluate", "fact_text",
    "format_table", "make_key", "parse_budget", "perplexity", "plant_fact", "plot", "recall_probe", "recalled",
    "stream_nll",
]
