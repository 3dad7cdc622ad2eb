"""A policy engine backed by a running Open Policy Agent server (``opa run --server``),
spoken to through ``opa-python-client`` (``opa_client.OpaClient``).

Policies reach the server one of two ways, found out at start:

- **the server loaded the signed bundle itself** (``opa run --bundle FILE
  --verification-key KEY``; the deployment's way): the gateway pushes no policy, and checks
  that the revision the server reports (``?provenance``) is the revision of the bundle the
  gateway verified itself, on every decision;
- **the server holds no bundle** (tests, development): the gateway pushes the policy files,
  from its verified bundle or from the policy directory (``PUT /v1/policies/<id>``).

The data document goes as one JSON Patch (``PATCH /v1/data/gateway``, applied atomically by
OPA) that sets ``catalog``, ``grants`` and ``grant_index``: the bundle owns ``gateway/authz``,
so the root document cannot be replaced whole. Each decision is ``POST
/v1/data/gateway/authz/decision?provenance=true``; its ``decision_id`` (set when the server
logs decisions, ``--set decision_logs.console=true``) goes into the audit entry.

Everything fails closed with :class:`~gateway.errors.PolicyEngineError`: the server
unreachable, slower than the timeout, answering anything but success, answering a result that
is missing or malformed, or running another bundle revision. Messages name the call, the file
and the HTTP status, never OPA's response text, which may echo request values.

How ``opa-python-client`` 3.0.0 is used, and the two places it is wrapped:

- ``OpaClient(host, port, ssl, retries=0, timeout=…)``: its ``timeout`` goes to every call
  (requests' connect and read timeouts, i.e. per socket operation: a server that answers
  nothing within it fails the call); ``retries=0`` switches off its urllib3 retry with
  back-off, which would hold a request for several timeouts;
- the session it builds reads proxy settings from the environment and follows redirects;
  the gateway's policy calls must go straight to the configured server, so the engine sets
  ``trust_env = False`` and ``max_redirects = 0`` on that session (``_session``, the one
  private attribute touched);
- policies are pushed with ``rego_compat=False``: otherwise a rejected policy is rewritten
  into another Rego syntax and uploaded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import quote, urlsplit

import requests
from opa_client import OpaClient  # type: ignore[import-untyped]
from opa_client.errors import PatchDataError  # type: ignore[import-untyped]

from gateway.errors import PolicyEngineError
from gateway.policy._sources import load_policy_sources, policies_dir, policy_version
from gateway.policy.bundle import PolicyBundle
from gateway.policy.data import encode_data, is_mapping
from gateway.policy.decision import (
    UNDEFINED,
    Decision,
    decision_from_document,
    note_policy_trace,
)
from gateway.policy.engine import DECISION_ENTRYPOINT, register_engine

__all__ = ["DEFAULT_OPA_URL", "OpaServerEngine"]

DEFAULT_OPA_URL: Final = "http://127.0.0.1:8181"

# Prefix of every policy id this engine pushes, so they never collide with other policies.
_POLICY_ID_PREFIX: Final = "yibao-gateway/"

# The members of data.gateway the gateway owns; the rest of data.gateway is the bundle's.
_DATA_MEMBERS: Final = ("catalog", "grants", "grant_index")
# Where the engine leaves a digest of the data it pushed, to notice a restarted (empty) server.
_PUSHED: Final = "pushed"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _State:
    loaded: bool = False
    failed: bool = False
    digest: str = ""
    body: tuple[tuple[str, Any], ...] = ()
    version: int | None = None


def _rule_path(entrypoint: str) -> tuple[str, str]:
    """``data.gateway.authz.decision`` -> (``gateway.authz``, ``decision``)."""
    parts = entrypoint.split(".")
    if len(parts) < 3 or parts[0] != "data" or not all(p.isidentifier() for p in parts[1:]):
        raise PolicyEngineError(f"invalid policy entrypoint {entrypoint!r}")
    return ".".join(parts[1:-1]), parts[-1]


def _client(url: str, timeout: float) -> Any:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise PolicyEngineError("the OPA URL must be http(s)://host:port with no path")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise PolicyEngineError("the OPA URL has an invalid port") from None
    client = OpaClient(
        host=parts.hostname, port=port, ssl=parts.scheme == "https", retries=0, timeout=timeout
    )
    # Straight to the configured server: no proxy from the environment, no redirect.
    client._session.trust_env = False
    client._session.max_redirects = 0
    return client


class OpaServerEngine:
    """Decisions from an OPA server.

    ``url`` is the server's base URL (loopback in tests and in the sidecar deployment);
    ``timeout`` (seconds, ``settings.opa_timeout_s``) bounds every call. ``bundle`` is the
    signed bundle the gateway verified (:func:`gateway.policy.bundle.load_bundle`); without
    it the policies come from ``policy_dir``. At construction the engine finds out whether
    the server runs a bundle (then it must be this revision) or needs the policies pushed,
    and evaluates an empty request, so a server that is down, runs other policies or rejects
    ours stops the gateway at startup.
    """

    name: str = "opa"
    in_process: bool = False  # an HTTP round trip per decision

    def __init__(
        self,
        url: str = DEFAULT_OPA_URL,
        policy_dir: str | os.PathLike[str] | None = None,
        *,
        bundle: PolicyBundle | None = None,
        data: Mapping[str, Any] | None = None,
        timeout: float = 0.5,
        entrypoint: str = DECISION_ENTRYPOINT,
    ) -> None:
        if not timeout > 0:
            raise PolicyEngineError("the OPA timeout must be positive")
        if bundle is not None and policy_dir is not None:
            raise PolicyEngineError("give a policy directory or a bundle, not both")
        if bundle is not None:
            self._sources = bundle.sources
        else:
            directory = policies_dir() if policy_dir is None else Path(policy_dir)
            self._sources = load_policy_sources(directory)
        self._version = policy_version(self._sources)
        self._revision = bundle.revision if bundle is not None else self._version
        self._package, self._rule = _rule_path(entrypoint)
        self._client = _client(url, timeout)
        self._write_lock = threading.Lock()
        self._state = _State()
        # Set once the server is found to run a bundle: every decision must report it.
        self._server_bundle = False
        try:
            self._start(bundle)
            if data is not None:
                self.set_data(data)
        except BaseException:
            self.close()
            raise

    @property
    def version(self) -> str:
        return self._version

    @property
    def revision(self) -> str:
        return self._revision

    def close(self) -> None:
        self._client.close_connection()

    def ready(self) -> bool:
        """Data loaded, not failing closed, the server answers its health check, still holds
        the data pushed (a restarted server has lost it: it is pushed again), and answers a
        probe decision (an empty request) well formed, in time, from the expected bundle."""
        state = self._state
        if not state.loaded or state.failed:
            return False
        if not self._client.check_health():
            return False
        try:
            pushed = self._client.get_data(f"gateway/{_PUSHED}").get("result")
        except Exception:  # the client's PolicyNotFoundError (nothing there), or no answer
            pushed = None
        if pushed is None:
            # The server restarted and lost the data: push the last good document again.
            try:
                with self._write_lock:
                    current = self._state  # the newest, should set_data have run meanwhile
                    if not current.loaded or current.failed:
                        return False
                    self._push(current)
            except PolicyEngineError:
                return False
        try:
            answer = self._evaluate({}, stage="ready")
            decision_from_document(
                answer.get("result", UNDEFINED), policy_version=self._version, engine=self.name
            )
        except PolicyEngineError:
            return False
        return True

    def set_data(self, data: Mapping[str, Any], *, version: int | None = None) -> None:
        """Replace the gateway's data on the server, in one atomic patch. On any failure the
        engine fails closed (every decision raises) until a good document is set.

        With ``version`` (the grants table's version), data the server already holds from a
        newer version (another worker pushed it) is left in place: a worker that read the
        grants just before a revocation must not put the revoked grant back."""
        with self._write_lock:
            failed = _State(failed=True)
            try:
                candidate = self._prepare(data, version)
                self._push(candidate)
                self._evaluate({}, stage="data")
            except PolicyEngineError:
                self._state = failed
                raise
            self._state = candidate

    def decide(self, policy_input: Mapping[str, Any]) -> Decision:
        note_policy_trace(self._revision)  # replaced below once OPA has decided
        if self._state.failed:
            raise PolicyEngineError("the policy data could not be loaded")
        if not is_mapping(policy_input):
            raise PolicyEngineError("the policy input must be a JSON object")
        answer = self._evaluate(policy_input, stage="decide")
        decision_id = answer.get("decision_id")
        if not isinstance(decision_id, str):
            decision_id = None
        note_policy_trace(self._revision, decision_id)
        return decision_from_document(
            answer.get("result", UNDEFINED),  # no "result": the decision is undefined
            policy_version=self._version,
            engine=self.name,
            bundle_revision=self._revision,
            decision_id=decision_id,
        )

    # --- internals ---------------------------------------------------------------------

    def _start(self, bundle: PolicyBundle | None) -> None:
        running = self._bundle_revisions(self._evaluate({}, stage="load", check=False))
        if running:
            if bundle is None:
                self._fail(
                    "load",
                    "bundle without a local copy",
                    "the OPA server runs a policy bundle; configure the same signed bundle "
                    "(settings.policy_bundle_path) so the gateway can verify it",
                )
            self._server_bundle = True
            self._check_revision(running, stage="load")
        else:
            self._push_policies()
        # The entrypoint must give a well-formed decision (a deny) for an empty request.
        answer = self._evaluate({}, stage="load")
        decision_from_document(
            answer.get("result", UNDEFINED), policy_version=self._version, engine=self.name
        )

    def _push_policies(self) -> None:
        for source in self._sources:
            policy_id = quote(_POLICY_ID_PREFIX + source.path, safe="")
            try:
                with self._guard("load"):
                    self._client.update_policy_from_string(
                        source.text, policy_id, rego_compat=False
                    )
            except PolicyEngineError as exc:
                raise PolicyEngineError(
                    f"the OPA server did not accept policy {source.path}: {exc.message}"
                ) from None

    def _prepare(self, data: Mapping[str, Any], version: int | None) -> _State:
        """The patch body for ``data``: its ``gateway`` members, with the grant index."""
        encoded = encode_data(data)  # validates, and derives the grant index
        document = json.loads(encoded)
        extra = sorted(set(document) - {"gateway"})
        if extra:
            raise PolicyEngineError(
                "the OPA engine pushes only data.gateway, not " + ", ".join(extra)
            )
        members = document.get("gateway", {})
        # Every owned member is set, absent ones to {} (the policy reads {} as it reads a
        # missing member), so a patch never leaves an older member in place.
        body = {key: members.get(key, {}) for key in _DATA_MEMBERS}
        body.update(members)
        digest = "sha256:" + hashlib.sha256(encoded.encode("utf-8")).hexdigest()
        body[_PUSHED] = {"digest": digest, "version": version}
        return _State(
            loaded=True, digest=digest, body=tuple(sorted(body.items())), version=version
        )

    def _newer_on_server(self, version: int | None) -> bool:
        """True when the server holds data pushed from a newer version than ``version``.
        (Read, then patch: OPA's JSON Patch has no ``test`` op, so two pushes racing
        within one round trip can still land in either order.)"""
        if version is None:
            return False
        try:
            pushed = self._client.get_data(f"gateway/{_PUSHED}").get("result")
        except Exception:  # nothing there yet (the client's PolicyNotFoundError), or no answer
            return False
        theirs = pushed.get("version") if isinstance(pushed, dict) else None
        return isinstance(theirs, int) and not isinstance(theirs, bool) and theirs > version

    def _push(self, state: _State) -> None:
        if self._newer_on_server(state.version):
            logger.info("policy engine %s: the server holds newer data; not replaced", self.name)
            return
        ops = [{"op": "add", "path": f"/{key}", "value": value} for key, value in state.body]
        try:
            with self._guard("data"):
                self._client.patch_data("gateway", ops)
            return
        except PatchDataError as exc:
            # OPA's JSON Patch does not create parents: on a fresh server data.gateway does
            # not exist yet. Anything else is a refusal (and no retry).
            if getattr(exc, "expression", None) != "resource_not_found":
                self._fail("data", "patch refused", "the OPA server refused the policy data")
        # Create data.gateway with an empty index, which hides every grant until the patch
        # below lands, then patch once.
        with self._guard("data"):
            self._client.update_or_create_data({}, "gateway/grant_index")
        try:
            with self._guard("data"):
                self._client.patch_data("gateway", ops)
        except PatchDataError:
            self._fail("data", "patch refused", "the OPA server refused the policy data")

    def _evaluate(
        self, policy_input: Mapping[str, Any], *, stage: str, check: bool = True
    ) -> dict[str, Any]:
        with self._guard(stage):
            answer = self._client.query_rule(
                input_data=policy_input,
                package_path=self._package,
                rule_name=self._rule,
                query_params={"provenance": "true"},
            )
        if not isinstance(answer, dict):
            self._fail(stage, "answer is not an object", "the OPA server answered malformed JSON")
        if check:
            self._check_revision(self._bundle_revisions(answer), stage=stage)
        return answer

    def _bundle_revisions(self, answer: Mapping[str, Any]) -> set[str]:
        provenance = answer.get("provenance")
        bundles = provenance.get("bundles") if isinstance(provenance, Mapping) else None
        if not isinstance(bundles, Mapping):
            return set()
        return {
            str(info.get("revision")) if isinstance(info, Mapping) else ""
            for info in bundles.values()
        }

    def _check_revision(self, running: set[str], *, stage: str) -> None:
        if not self._server_bundle and not running:
            return
        if running != {self._revision}:
            shown = "no policy bundle" if not running else (
                "policy bundle revision " + ", ".join(sorted(running)))
            self._fail(
                stage,
                "bundle revision mismatch",
                f"the OPA server runs {shown}, the gateway verified {self._revision}",
            )

    @contextmanager
    def _guard(self, stage: str) -> Iterator[None]:
        """Map everything the client (requests underneath) raises to PolicyEngineError."""
        try:
            yield
        except (PolicyEngineError, PatchDataError):
            raise  # already mapped; a refused patch is handled by _push
        except requests.exceptions.JSONDecodeError:
            self._fail(stage, "malformed JSON", "the OPA server answered malformed JSON")
        except requests.exceptions.InvalidJSONError:
            self._fail(stage, "request not JSON", "the policy input is not a JSON document")
        except requests.Timeout:
            self._fail(stage, "timeout", "the OPA server did not answer in time")
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            self._fail(stage, f"HTTP {status}", f"the OPA server answered HTTP {status}")
        except requests.RequestException as exc:
            self._fail(stage, type(exc).__name__, "the OPA server cannot be reached")
        except TypeError:
            # requests' JSON encoder meets a value JSON has no form for.
            self._fail(stage, "request not JSON", "the policy input is not a JSON document")
        except ValueError:
            self._fail(stage, "malformed JSON", "the OPA server answered malformed JSON")
        except Exception as exc:  # the client's own errors (RegoParseError, …)
            self._fail(stage, type(exc).__name__, "the OPA server refused the request")

    def _fail(self, stage: str, what: str, message: str) -> NoReturn:
        logger.error("policy engine %s failed during %s: %s", self.name, stage, what)
        raise PolicyEngineError(message) from None


register_engine("opa", OpaServerEngine)
