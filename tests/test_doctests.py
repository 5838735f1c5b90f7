"""The examples in the public docstrings run and print what they say."""
import doctest

import pytest

import fastconv
import fastconv._threading
import fastconv.functional


@pytest.mark.parametrize("module", [fastconv.functional, fastconv._threading])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_every_public_function_has_an_example():
    for name in fastconv.__all__:
        doc = getattr(fastconv, name).__doc__
        assert doc and ">>>" in doc, name
        assert "Parameters" in doc or "Returns" in doc, name
