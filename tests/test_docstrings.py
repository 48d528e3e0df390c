"""Every public name says what it is."""

import dataclasses
import inspect

import pytest

import sparse_peft as sp
from sparse_peft.sparsity.report import LayerSparsity

PUBLIC = {name: getattr(sp, name) for name in sp.__all__}
PUBLIC["LayerSparsity"] = LayerSparsity


def own_docstring(obj) -> str:
    """The docstring written for ``obj`` itself: a class's is not inherited, and the signature that
    ``@dataclass`` fills in for a class without one does not count."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    doc = (doc or "").strip()
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc


def test_all_names_exist():
    assert [name for name in sp.__all__ if not hasattr(sp, name)] == []


@pytest.mark.parametrize("name", sorted(name for name, obj in PUBLIC.items() if callable(obj)))
def test_public_callable_has_a_docstring(name):
    assert own_docstring(PUBLIC[name]), f"sparse_peft.{name} has no docstring"


def test_a_dataclass_signature_is_not_a_docstring():
    @dataclasses.dataclass
    class Undocumented:
        x: int

    assert Undocumented.__doc__ and own_docstring(Undocumented) == ""
