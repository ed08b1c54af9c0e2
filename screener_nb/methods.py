"""The method vocabulary: a Screener method is a (condition, density) pair, named
``<condition>-<density>`` (``learned-flow`` is the paper's Screener).

At the bottom of the import graph (it imports only the errors), so the stages, the
inference facade and the notebooks share one parser::

    >>> m = Method.parse("learned-flow")
    >>> m.condition, m.density, str(m)
    ('learned', 'flow', 'learned-flow')
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

CONDITIONS = ("none", "sincos", "learned")
#: ``residual``: the context condition's own predictive density of the cell intensities
#: (:mod:`screener_nb.models.residual`); only with the ``learned`` context condition
DENSITIES = ("gaussian", "flow", "residual")


@dataclass(frozen=True)
class Method:
    """One (condition, density) pair; invalid pairs are a :class:`~screener_nb.errors.ConfigError`."""

    condition: str
    density: str

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ConfigError(f"unknown condition {self.condition!r}; known: {', '.join(CONDITIONS)}")
        if self.density not in DENSITIES:
            raise ConfigError(f"unknown density {self.density!r}; known: {', '.join(DENSITIES)}")
        if self.density == "residual" and self.condition != "learned":
            raise ConfigError(f"density 'residual' is the learned context condition's own prediction: "
                              f"expected condition 'learned', found {self.condition!r}")

    @classmethod
    def parse(cls, name: str, param: str = "method") -> "Method":
        """``"learned-flow"`` -> ``Method("learned", "flow")``; a clear error naming ``param`` otherwise."""
        parts = str(name).split("-")
        if len(parts) != 2:
            raise ConfigError(f"parameter {param!r}: expected <condition>-<density> (e.g. learned-flow), found {name!r}")
        return cls(*parts)

    @classmethod
    def all(cls) -> list["Method"]:
        """Every valid pair, conditions outer and densities inner, in the vocabulary's order."""
        out = []
        for c in CONDITIONS:
            for d in DENSITIES:
                try:
                    out.append(cls(c, d))
                except ConfigError:
                    continue
        return out

    def __str__(self) -> str:
        return f"{self.condition}-{self.density}"


def method_name(condition: str, density: str) -> str:
    """``"<condition>-<density>"`` of a valid pair."""
    return str(Method(condition, density))


def check_method(condition: str, density: str) -> None:
    """Raise :class:`~screener_nb.errors.ConfigError` unless (condition, density) is a valid pair."""
    Method(condition, density)
