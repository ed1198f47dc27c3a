"""SPEC functions for fuzzing the command line: each returns (or does) something load_spec must refuse."""
from __future__ import annotations

import torch

NOT_CALLABLE = 3


def returns_none():
    return None


def returns_short_tuple():
    return (torch.nn.Linear(2, 2),)


def returns_dict_without_model():
    return {"dummy_input": torch.randn(1, 2), "data": torch.randn(4, 2)}


def returns_unknown_keys():
    return {"model": torch.nn.Linear(2, 2), "dummy_input": torch.randn(1, 2), "data": torch.randn(4, 2), "x": 1}


def returns_not_a_module():
    return ("model", torch.randn(1, 2), torch.randn(4, 2))


def returns_bad_metric():
    return (torch.nn.Linear(2, 2), torch.randn(1, 2), torch.randn(4, 2), "accuracy")


def returns_bad_name():
    return {"model": torch.nn.Linear(2, 2), "dummy_input": torch.randn(1, 2), "data": torch.randn(4, 2),
            "name": "../outside"}


def raises():
    raise ValueError("the model cannot be built")
