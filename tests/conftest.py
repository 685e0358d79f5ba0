"""Shared fixtures. Without CUDA, Triton kernels run under the interpreter (set before any kernel import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tiny import tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture
def tiny_pair(tiny_tok):
    """(model, tokenizer): a random tiny Llama whose vocabulary covers the tiny tokenizer."""
    return tiny_llama(vocab=len(tiny_tok)), tiny_tok
