"""This package's CI: prunekit's conformance kit (a pytest plugin that comes with prunekit)."""

import pytest


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_method_conforms(prunekit_conformance, prunekit_registry, method):
    assert prunekit_registry.method(method).provider == "prunekit-activation-methods"
    prunekit_conformance(method)
