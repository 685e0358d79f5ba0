import pytest
import torch

from halo.extension import load_operators
from halo.cull_ops import operator_available


def test_a_missing_operator_is_not_loaded():
    assert load_operators({"no_such_operator": lambda x: x}) is False


@pytest.mark.skipif(not operator_available(), reason="halo._C is not built")
def test_a_registered_operator_loads_twice_with_its_fake():
    fake = {"cull_scores_rows": lambda brightness, order, counts, dark_bias, radius: torch.empty_like(brightness)}
    assert load_operators(fake) is True
    assert load_operators(fake) is True  # a second registration of the fake is not an error
