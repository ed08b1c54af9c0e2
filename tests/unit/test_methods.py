"""The method vocabulary (screener_nb.methods)."""
from __future__ import annotations

import doctest

import pytest

from screener_nb import methods as M
from screener_nb.errors import ConfigError


def test_parse_and_name_round_trip():
    for m in M.Method.all():
        assert M.Method.parse(str(m)) == m and M.method_name(m.condition, m.density) == str(m)
    # every condition with gaussian and flow, and the residual of the learned condition only: 3 x 2 + 1
    names = [str(m) for m in M.Method.all()]
    assert names == ["none-gaussian", "none-flow", "sincos-gaussian", "sincos-flow",
                     "learned-gaussian", "learned-flow", "learned-residual"]


def test_bad_names_say_what_was_expected():
    with pytest.raises(ConfigError, match=r"parameter 'teacher': expected <condition>-<density>.*'learnedflow'"):
        M.Method.parse("learnedflow", "teacher")
    with pytest.raises(ConfigError, match="unknown density 'maf'"):
        M.Method.parse("learned-maf")
    with pytest.raises(ConfigError, match="unknown condition 'pos'"):
        M.check_method("pos", "flow")
    with pytest.raises(ConfigError, match="expected condition 'learned', found 'none'"):
        M.Method("none", "residual")
    with pytest.raises(Exception):  # frozen
        M.Method("none", "flow").density = "gaussian"


def test_module_doctest():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(M, "methods", globs=vars(M).copy()):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and runner.summarize(verbose=False).attempted >= 2
