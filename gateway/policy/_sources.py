"""Finding, reading and fingerprinting the Rego policy files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import gateway
from gateway.errors import PolicyEngineError

__all__ = ["PolicySource", "load_policy_sources", "policies_dir", "policy_version"]

_TEST_SUFFIX = "_test.rego"


@dataclass(frozen=True)
class PolicySource:
    """One policy file: its path relative to the policy directory and its text."""

    path: str
    text: str


def policies_dir() -> Path:
    """The repository's ``policies/`` directory (the project is installed editable)."""
    return Path(gateway.__file__).resolve().parents[1] / "policies"


def load_policy_sources(directory: Path) -> tuple[PolicySource, ...]:
    """Every ``*.rego`` under ``directory`` except ``*_test.rego``, sorted by path.

    Raises :class:`PolicyEngineError` when the directory is missing, holds no policy, or a
    file cannot be read: the gateway must not start without its policies.
    """
    if not directory.is_dir():
        raise PolicyEngineError(f"policy directory {directory} does not exist")
    paths = sorted(
        p for p in directory.rglob("*.rego") if p.is_file() and not p.name.endswith(_TEST_SUFFIX)
    )
    if not paths:
        raise PolicyEngineError(f"policy directory {directory} holds no policy")
    sources = []
    for path in paths:
        relative = path.relative_to(directory).as_posix()
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            raise PolicyEngineError(f"policy {relative} cannot be read") from None
        sources.append(PolicySource(relative, text))
    return tuple(sources)


def policy_version(sources: tuple[PolicySource, ...]) -> str:
    """A content hash of the loaded policy files: ``sha256:`` and 16 hex digits.

    Names and texts are length-prefixed so that moving text between files, or renaming one,
    changes the version too.
    """
    digest = hashlib.sha256()
    for source in sources:
        for part in (source.path.encode("utf-8"), source.text.encode("utf-8")):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return "sha256:" + digest.hexdigest()[:16]
