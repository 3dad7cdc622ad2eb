"""The Rego unit tests: every ``test_*`` rule of every ``*_test.rego`` under ``policies/``,
run through regorus's interpreter (it supports ``with``), one pytest case per Rego test.

Run just these with ``.venv/bin/pytest tests/unit/test_rego_suite.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import regorus

from gateway.policy import policies_dir

POLICIES = policies_dir()
TEST_SUFFIX = "_test.rego"
TEST_FILES = sorted(POLICIES.rglob(f"*{TEST_SUFFIX}"))
POLICY_FILES = sorted(p for p in POLICIES.rglob("*.rego") if not p.name.endswith(TEST_SUFFIX))


def _name(path: Path) -> str:
    return path.relative_to(POLICIES).as_posix()


def _clean(error: BaseException) -> str:
    # Keep the Rego location and message, drop the Rust backtrace.
    return str(error).split("Stack backtrace")[0].strip()


def _rule_name(rule: dict[str, Any]) -> str | None:
    """The name of a plain ``name if {...}`` / ``name := ...`` rule, else None."""
    head = rule.get("Spec", {}).get("head", {})
    complete = head.get("Compr") if isinstance(head, dict) else None
    if not isinstance(complete, dict):
        return None
    var = complete.get("refr", {}).get("Var")
    return var.get("value") if isinstance(var, dict) else None


_ENGINES: dict[Path, tuple[regorus.Engine, str]] = {}


def _engine(test_file: Path) -> tuple[regorus.Engine, str]:
    """All policies plus this one test file; the package path of the test file."""
    if test_file not in _ENGINES:
        engine = regorus.Engine()
        for policy in POLICY_FILES:
            engine.add_policy(_name(policy), policy.read_text("utf-8"))
        package = engine.add_policy(_name(test_file), test_file.read_text("utf-8"))
        _ENGINES[test_file] = (engine, package)
    return _ENGINES[test_file]


def _test_rules(test_file: Path) -> list[str]:
    engine, _ = _engine(test_file)
    names: set[str] = set()
    for module in json.loads(engine.get_ast_as_json()):
        if module["source"]["file"] != _name(test_file):
            continue
        for rule in module["ast"]["rules"]:
            name = _rule_name(rule)
            if name is not None and name.startswith("test_"):
                names.add(name)
    return sorted(names)


def _cases() -> list[Any]:
    return [
        pytest.param(test_file, rule, id=f"{_name(test_file)}::{rule}")
        for test_file in TEST_FILES
        for rule in _test_rules(test_file)
    ]


def test_there_are_rego_tests() -> None:
    assert POLICY_FILES, f"no policies under {POLICIES}"
    assert TEST_FILES, f"no *{TEST_SUFFIX} under {POLICIES}"


@pytest.mark.parametrize("policy", POLICY_FILES, ids=_name)
def test_every_policy_has_a_test_file_beside_it(policy: Path) -> None:
    assert policy.with_name(policy.stem + TEST_SUFFIX).is_file()


@pytest.mark.parametrize("test_file", TEST_FILES, ids=_name)
def test_every_test_file_has_tests(test_file: Path) -> None:
    assert _test_rules(test_file), f"{_name(test_file)} defines no test_ rule"


@pytest.mark.parametrize(("test_file", "rule"), _cases())
def test_rego(test_file: Path, rule: str) -> None:
    engine, package = _engine(test_file)
    try:
        result = engine.eval_rule(f"{package}.{rule}")
    except RuntimeError as error:
        pytest.fail(f"{rule} raised:\n{_clean(error)}", pytrace=False)
    # Undefined (None) is a failed test, as in `opa test`.
    assert result is True, f"{rule} is {result!r}, not true"
