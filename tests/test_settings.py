"""Site settings (``protocol.settings``): the class allow list names exact production classes."""

import importlib

import pytest

from split_unet.protocol.settings import CLASS_ALLOW_LIST

pytestmark = pytest.mark.unit


def test_the_class_allow_list_names_exact_production_classes():
    for entry in CLASS_ALLOW_LIST:
        module, _, name = entry.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), entry
    assert not any(entry.endswith(".") for entry in CLASS_ALLOW_LIST)  # no package prefix
    assert not any("LeakageRecorder" in entry or "Decomposer" in entry for entry in CLASS_ALLOW_LIST)
