"""Stage parameters: profile defaults, type checks, unknown names."""
import pytest

from screener_nb import config
from screener_nb.errors import ConfigError


def test_profile_defaults_fill_none_and_keep_given_values():
    q = config.resolve("descriptor", {"profile": "quick", "steps": None, "run_dir": "r"})
    d = config.resolve("descriptor", {"profile": "demo", "steps": None, "run_dir": "r"})
    f = config.resolve("descriptor", profile="full", run_dir="r")
    assert q.steps == config.STAGES["descriptor"]["params"]["steps"].default["quick"]
    assert (q.steps, d.steps, f.steps) == (30, 250, 300_000)
    assert f.patch == (96, 96, 64) and f.model_size == "paper" and f.expander_width == 8192
    assert config.resolve("descriptor", profile="demo", steps=7).steps == 7


def test_namespace_is_filtered_to_the_stage():
    ns = {"profile": "quick", "steps": 3, "not_a_param": 1, "cfg": object()}
    assert config.resolve("density", ns).steps == 3  # other notebook globals are ignored


@pytest.mark.parametrize("given, message", [
    ({"stepz": 3}, "unknown parameter 'stepz'.*did you mean steps"),
    ({"steps": "many"}, "'steps': expected an integer, found 'many'"),
    ({"steps": 2.5}, "'steps': expected an integer"),
    ({"loss": "mse"}, "'loss': expected one of vicreg, infonce"),
    ({"patch": "48,48"}, "'patch': expected 3 sizes"),
    ({"steps": 0}, "'steps': expected a positive integer"),
    ({"mask_ratio": 1.5}, "'mask_ratio': expected a value in"),
])
def test_bad_values_are_config_errors(given, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve("condition", profile="quick", **given)


def test_cli_strings_are_coerced():
    v = config.validate("condition", {"steps": "12", "patch": "32,32,16", "mask_prob": "0.25"})
    assert v == {"steps": 12, "patch": (32, 32, 16), "mask_prob": 0.25}
    assert config.parse_cli_value("[48, 48, 32]") == [48, 48, 32]
    assert config.validate("explore", {"interactive": "true"}) == {"interactive": True}


def test_runner_view_rejects_names_no_stage_knows():
    assert config.validate(None, {"steps": 5, "dataset": "phantoms"}) == {"steps": 5, "dataset": "phantoms"}
    with pytest.raises(ConfigError, match="unknown parameter 'datset' for any stage"):
        config.validate(None, {"datset": "phantoms"})


def test_condition_and_density_lists_are_checked():
    with pytest.raises(ConfigError, match="unknown posenc"):
        config.resolve("density", profile="quick", conditions="none,posenc")
    assert config.split_list(" none, learned ,") == ["none", "learned"]


@pytest.mark.parametrize("stage", config.STAGE_ORDER)
def test_each_notebooks_parameters_cell_declares_exactly_its_stage_parameters(stage):
    """papermill can only set what the parameters cell declares; a config name missing
    there (or a stray one) would be silently ignored or refused."""
    import ast
    from pathlib import Path

    import jupytext

    path = Path(__file__).parents[2] / "notebooks" / f"{config.NOTEBOOKS[stage]}.py"
    cells = [c for c in jupytext.read(path).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one parameters cell, found {len(cells)}"
    declared = {t.id for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    expected = set(config.STAGES[stage]["params"]) | set(config.COMMON)
    assert declared == expected, (f"{path.name}: missing {sorted(expected - declared)}, "
                                  f"unknown {sorted(declared - expected)}")


@pytest.mark.parametrize("stage", config.STAGE_ORDER)
def test_papermill_reads_every_parameter_and_its_comment(stage, tmp_path, caplog):
    """papermill's own parser (``--help-notebook``) finds every parameter of the cell with its
    comment as help; a line it cannot parse loses its documentation and logs a warning."""
    import logging
    from pathlib import Path

    import jupytext
    import nbformat
    import papermill as pm

    path = Path(__file__).parents[2] / "notebooks" / f"{config.NOTEBOOKS[stage]}.py"
    nb = jupytext.read(path)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    ipynb = tmp_path / f"{path.stem}.ipynb"
    nbformat.write(nb, str(ipynb))
    with caplog.at_level(logging.WARNING, logger="papermill"):
        found = pm.inspect_notebook(str(ipynb))
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    expected = set(config.STAGES[stage]["params"]) | set(config.COMMON)
    assert set(found) == expected
    assert all(p["help"] for p in found.values()), [n for n, p in found.items() if not p["help"]]
