"""Halo inside other engines: one subpackage per engine (vllm)."""
