"""Policy engines: the extension point, its registry, and the embedded regorus engine.

A :class:`PolicyEngine` answers one :class:`~gateway.policy.decision.Decision` per request
from the Rego policies in ``policies/`` and a data document pushed whole with ``set_data``.
Every failure fails closed: loading, data and evaluation problems raise
:class:`~gateway.errors.PolicyEngineError` (503 + deny), with generic messages that never
carry the engine's own error text (a Rust backtrace, possibly echoing request values).

regorus objects are *unsendable*: an ``Engine``, ``Program`` or ``Rvm`` used, or even dropped,
on a thread other than the one that made it panics. So :class:`RegorusEngine` keeps one
evaluator per thread (a lock around a shared one cannot work) and a generation counter that
``set_data`` bumps; each thread reloads the data on its next decision, so a change holds
from the next request.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import orjson
import regorus

from gateway.errors import PolicyEngineError
from gateway.policy._sources import (
    PolicySource,
    load_policy_sources,
    policies_dir,
    policy_version,
)
from gateway.policy.bundle import PolicyBundle
from gateway.policy.data import ENCODER, encode_data, is_mapping
from gateway.policy.decision import (
    UNDEFINED,
    Decision,
    decision_from_document,
    note_policy_trace,
)

__all__ = [
    "DECISION_ENTRYPOINT",
    "EngineFactory",
    "PolicyEngine",
    "RegorusEngine",
    "build_engine",
    "policies_dir",
    "register_engine",
]

DECISION_ENTRYPOINT: Final = "data.gateway.authz.decision"

logger = logging.getLogger(__name__)


@runtime_checkable
class PolicyEngine(Protocol):
    """What the gateway needs from a policy engine (embedded regorus, an OPA server)."""

    name: str
    # True when decide() only computes (no I/O): a caller on an event loop may call it inline.
    in_process: bool

    @property
    def version(self) -> str:
        """Content hash of the loaded policy files, e.g. ``sha256:0123456789abcdef``."""
        ...

    @property
    def revision(self) -> str:
        """The signed bundle's manifest revision, or :attr:`version` without a bundle."""
        ...

    def set_data(self, data: Mapping[str, Any], *, version: int | None = None) -> None:
        """Replace the whole policy data document; decisions use it from the next request.

        ``version``: the monotonic version of what the data was read from (the grants
        table). An engine shared by several processes (one OPA server behind several
        workers) never replaces data of a newer version with older data."""
        ...

    def decide(self, policy_input: Mapping[str, Any]) -> Decision:
        """One decision, or :class:`PolicyEngineError` (the caller then denies)."""
        ...

    def ready(self) -> bool:
        """True once policies and data are loaded and the engine is not failing closed."""
        ...


EngineFactory = Callable[..., PolicyEngine]

_FACTORIES: dict[str, EngineFactory] = {}


def register_engine(kind: str, factory: EngineFactory, *, replace: bool = False) -> None:
    """Make ``build_engine(kind, ...)`` call ``factory(...)``."""
    if kind in _FACTORIES and not replace:
        raise PolicyEngineError(f"policy engine {kind!r} is already registered")
    _FACTORIES[kind] = factory


def build_engine(kind: str = "regorus", **options: Any) -> PolicyEngine:
    """Build the policy engine named by configuration."""
    factory = _FACTORIES.get(kind)
    if factory is None:
        known = ", ".join(sorted(_FACTORIES))
        raise PolicyEngineError(f"unknown policy engine {kind!r} (known: {known})")
    try:
        return factory(**options)
    except TypeError:
        raise PolicyEngineError(f"invalid options for policy engine {kind!r}") from None


# --- regorus ---------------------------------------------------------------------------

# Where in a policy a regorus error points ("--> authz.rego:12:5"); the rest of its message
# (source excerpt, values, Rust backtrace) is never shown or logged.
_LOCATION = re.compile(r"-->\s*(?P<file>[^\s:]+):(?P<line>\d+):(?P<col>\d+)")

# The RVM's result for an undefined entrypoint.
_RVM_UNDEFINED = '"<undefined>"'


def _where(exc: BaseException) -> str:
    match = _LOCATION.search(str(exc))
    if match is None:
        return ""
    return f" at {match['file']}:{match['line']}:{match['col']}"


def _is_engine_failure(exc: BaseException) -> bool:
    # pyo3 panics (e.g. an object used on a foreign thread) derive from BaseException.
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _input_json(policy_input: Mapping[str, Any]) -> str:
    return ENCODER.encode(policy_input)


class _Evaluator(Protocol):
    """One thread's compiled policy."""

    def load_data(self, data_json: str) -> None: ...

    def evaluate(self, policy_input: Mapping[str, Any]) -> object: ...


@dataclass
class _Build:
    """What every thread builds its evaluator from."""

    sources: tuple[PolicySource, ...]
    entrypoint: str
    # The compiled program as bytes: programs are unsendable, their bytes are not, and
    # loading them (~0.1 ms) is much cheaper than compiling again (~10 ms).
    artifact: bytes | None = None


class _CompiledEvaluator:
    """The regorus VM (RVM): the policy compiled to bytecode, about 3x faster than the
    interpreter. Builtin errors are undefined here, as in OPA."""

    def __init__(self, build: _Build) -> None:
        self._program = self._load(build)
        self._vm = regorus.Rvm()
        self._vm.load_program(self._program)

    @staticmethod
    def _load(build: _Build) -> Any:
        if build.artifact is not None:
            program, partial = regorus.Program.deserialize_binary(build.artifact)
            if not partial:  # partial: written by another regorus build, compile afresh
                return program
        modules = [(source.path, source.text) for source in build.sources]
        program = regorus.Program.compile_from_modules("{}", modules, [build.entrypoint])
        build.artifact = program.serialize_binary()
        return program

    def load_data(self, data_json: str) -> None:
        self._vm.set_data_json(data_json)

    def evaluate(self, policy_input: Mapping[str, Any]) -> object:
        self._vm.set_input_json(_input_json(policy_input))
        result = self._vm.execute()
        if result.strip() == _RVM_UNDEFINED:
            return UNDEFINED
        # orjson: ~4x faster than json.loads on this document (bench/policy_decision.py).
        return orjson.loads(result)


class _InterpreterEvaluator:
    """The regorus tree-walking interpreter: what ``opa test``-style suites run on (it
    supports ``with``). Builtin errors raise here."""

    def __init__(self, build: _Build) -> None:
        self._engine = regorus.Engine()
        for source in build.sources:
            self._engine.add_policy(source.path, source.text)
        self._rule = build.entrypoint

    def load_data(self, data_json: str) -> None:
        self._engine.clear_data()
        self._engine.add_data_json(data_json)

    def evaluate(self, policy_input: Mapping[str, Any]) -> object:
        self._engine.set_input_json(_input_json(policy_input))
        value = self._engine.eval_rule(self._rule)
        return UNDEFINED if value is None else value


_EVALUATORS: Final[dict[str, Callable[[_Build], _Evaluator]]] = {
    "compiled": _CompiledEvaluator,
    "interpreter": _InterpreterEvaluator,
}


@dataclass(frozen=True)
class _DataState:
    """The data every thread should be deciding with. Replaced whole, never mutated."""

    generation: int
    data_json: str
    loaded: bool = False
    failed: bool = False


@dataclass
class _Slot:
    """One thread's evaluator for one engine, and the data generation it holds."""

    owner: weakref.ref[RegorusEngine]
    evaluator: _Evaluator
    generation: int = -1


_serials = itertools.count(1)
_thread = threading.local()


def _thread_slots() -> dict[int, _Slot]:
    slots: dict[int, _Slot] | None = getattr(_thread, "slots", None)
    if slots is None:
        slots = {}
        _thread.slots = slots
    return slots


class RegorusEngine:
    """Rego evaluated in-process by regorus.

    Loads every ``*.rego`` under ``policy_dir`` (default: the repository's ``policies/``)
    except ``*_test.rego``, compiles it and evaluates an empty request once, so that a policy
    that does not parse or compile stops the gateway at startup (regorus reports some compile
    errors only on the first evaluation). What the decision says is checked on every
    :meth:`decide`, where an undefined or malformed one raises.

    ``mode`` is ``"compiled"`` (the regorus VM, the default: about 3x faster) or
    ``"interpreter"`` (the reference evaluator the Rego test suite runs on).

    ``bundle`` (a signed bundle verified by :func:`gateway.policy.bundle.load_bundle`)
    replaces ``policy_dir``; its manifest revision is then each decision's
    ``bundle_revision``.
    """

    name: str = "regorus"
    in_process: bool = True

    def __init__(
        self,
        policy_dir: str | os.PathLike[str] | None = None,
        *,
        bundle: PolicyBundle | None = None,
        data: Mapping[str, Any] | None = None,
        mode: str = "compiled",
        entrypoint: str = DECISION_ENTRYPOINT,
    ) -> None:
        make = _EVALUATORS.get(mode)
        if make is None:
            raise PolicyEngineError(f"unknown regorus mode {mode!r}")
        self._make = make
        if bundle is not None and policy_dir is not None:
            raise PolicyEngineError("give a policy directory or a bundle, not both")
        if bundle is not None:
            sources = bundle.sources
        else:
            directory = policies_dir() if policy_dir is None else Path(policy_dir)
            sources = load_policy_sources(directory)
        self._version = policy_version(sources)
        self._revision = bundle.revision if bundle is not None else self._version
        self._build = _Build(sources, entrypoint)
        self._serial = next(_serials)
        self._write_lock = threading.Lock()
        self._state = _DataState(generation=0, data_json="{}")
        self._check(self._state, stage="load")
        if data is not None:
            self.set_data(data)

    @property
    def version(self) -> str:
        return self._version

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def mode(self) -> str:
        return "compiled" if self._make is _CompiledEvaluator else "interpreter"

    def ready(self) -> bool:
        state = self._state
        return state.loaded and not state.failed

    def set_data(self, data: Mapping[str, Any], *, version: int | None = None) -> None:
        """Replace the whole data document (``version`` is not needed: this engine is not
        shared between processes). It is checked on this thread first; if it
        cannot be used the engine fails closed (every decision raises) until a good one
        is set, so a failed update can never leave an older, wider grant in force."""
        with self._write_lock:
            generation = self._state.generation + 1
            failed = _DataState(generation=generation, data_json="{}", failed=True)
            try:
                data_json = encode_data(data)
            except PolicyEngineError:
                self._state = failed
                raise
            candidate = _DataState(generation=generation, data_json=data_json, loaded=True)
            try:
                self._check(candidate, stage="data")
            except PolicyEngineError:
                self._state = failed
                raise
            self._state = candidate

    def decide(self, policy_input: Mapping[str, Any]) -> Decision:
        note_policy_trace(self._revision)
        state = self._state
        if state.failed:
            raise PolicyEngineError("the policy data could not be loaded")
        if not is_mapping(policy_input):
            raise PolicyEngineError("the policy input must be a JSON object")
        document = self._evaluate(state, policy_input, stage="decide")
        return decision_from_document(
            document,
            policy_version=self._version,
            engine=self.name,
            bundle_revision=self._revision,
        )

    # --- internals ---------------------------------------------------------------------

    def _evaluator(self, state: _DataState) -> _Evaluator:
        """This thread's evaluator, holding ``state``'s data."""
        slots = _thread_slots()
        slot = slots.get(self._serial)
        if slot is None:
            # Drop evaluators of engines that are gone; only this thread may.
            for serial in [s for s, other in slots.items() if other.owner() is None]:
                del slots[serial]
            evaluator = self._make(self._build)
            slot = _Slot(owner=weakref.ref(self), evaluator=evaluator)
            slots[self._serial] = slot
        if slot.generation != state.generation:
            slot.evaluator.load_data(state.data_json)
            slot.generation = state.generation
        return slot.evaluator

    def _evaluate(
        self, state: _DataState, policy_input: Mapping[str, Any], *, stage: str
    ) -> object:
        try:
            return self._evaluator(state).evaluate(policy_input)
        except BaseException as exc:
            if not _is_engine_failure(exc):
                raise
            # Start this thread afresh next time rather than trust a half-updated evaluator.
            _thread_slots().pop(self._serial, None)
            logger.error(
                "policy engine %s failed during %s: %s%s",
                self.name,
                stage,
                type(exc).__name__,
                _where(exc),
            )
            if stage == "load":
                raise PolicyEngineError(
                    f"the policies in this directory do not load{_where(exc)}"
                ) from None
            if stage == "data":
                raise PolicyEngineError("the policy data cannot be evaluated") from None
            raise PolicyEngineError("the policy engine failed to evaluate the request") from None

    def _check(self, state: _DataState, *, stage: str) -> None:
        """Evaluate an empty request on this thread: the policy (and data) must evaluate."""
        self._evaluate(state, {}, stage=stage)


register_engine("regorus", RegorusEngine)
