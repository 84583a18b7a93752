"""The family-generic suite: every test here runs once per registered family (``eligen.families.FAMILIES``), so a new
family passes it by being registered, with nothing to add here.

Each family's tiny random pipeline (its card's ``tiny_pipeline`` writer) is written once per session, in its normal
depth and with a one-block transformer, under ``tmp_path_factory``, and loaded with ``from_pretrained`` (the EliGen
pipeline of the family, and its stock diffusers pipeline, ``card.pipelines[0]``); see :class:`families.support.Tiny`.
The pipelines the session shares are only called, never changed; a test that changes one (a LoRA) loads its own.
The oracles the tests compare against are :mod:`families.oracles`.
"""

from __future__ import annotations

import pytest

from eligen.families import FAMILIES, get_family
from families.support import Tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session", params=FAMILIES)
def family_name(request) -> str:
    """Every registered family, by name (the tests' ids)."""
    return request.param


@pytest.fixture(scope="session")
def family(family_name):
    """The family's :class:`~eligen.families.base.ModelFamily`."""
    return get_family(family_name)


@pytest.fixture
def pipe(tiny, family_name):
    """The family's EliGen pipeline of the session (normal depth)."""
    return tiny.shared(family_name)


@pytest.fixture
def stock_pipe(tiny, family_name):
    """The family's stock diffusers pipeline of the session, on the same weights."""
    return tiny.shared(family_name, stock=True)


@pytest.fixture
def one_layer_pipe(tiny, family_name):
    """The family's EliGen pipeline whose transformer is one block."""
    return tiny.shared(family_name, layers=1)
