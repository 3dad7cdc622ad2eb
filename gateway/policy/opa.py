"""A policy engine backed by a running Open Policy Agent server (``opa run --server``).

The same Rego files as the embedded engine are pushed to the server over its REST API
(``PUT /v1/policies/<id>``), the data document is pushed whole (``PUT /v1/data``), and each
decision is ``POST /v1/data/gateway/authz/decision``. Everything fails closed with
:class:`~gateway.errors.PolicyEngineError`: the server unreachable, slower than the timeout,
answering anything but 200, or answering a result that is missing or malformed.

Why plain httpx rather than ``opa-python-client``: that client (3.0.0) adds requests, aiohttp
and aiofiles to the gateway's dependencies, ships no type information, retries failed calls
with back-off by default (a slow server would hold a request for several timeouts), and on a
rejected policy upload silently rewrites the policy into another Rego syntax and tries again.
The gateway needs three REST calls with one strict timeout and no retry; httpx is already a
dependency.

Messages name the policy file, the call and the HTTP status, never OPA's response text, which
may echo request values.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx

from gateway.errors import PolicyEngineError
from gateway.policy._sources import load_policy_sources, policies_dir, policy_version
from gateway.policy.data import ENCODER, encode_data, is_mapping
from gateway.policy.decision import UNDEFINED, Decision, decision_from_document
from gateway.policy.engine import DECISION_ENTRYPOINT, register_engine

__all__ = ["DEFAULT_OPA_URL", "OpaServerEngine"]

DEFAULT_OPA_URL: Final = "http://127.0.0.1:8181"

# Prefix of every policy id this engine pushes, so they never collide with other policies.
_POLICY_ID_PREFIX: Final = "yibao-gateway/"

logger = logging.getLogger(__name__)


def _data_path(entrypoint: str) -> str:
    """``data.gateway.authz.decision`` -> ``gateway/authz/decision``."""
    parts = entrypoint.split(".")
    if len(parts) < 2 or parts[0] != "data" or not all(parts[1:]):
        raise PolicyEngineError(f"invalid policy entrypoint {entrypoint!r}")
    return "/".join(quote(part, safe="") for part in parts[1:])


@dataclass(frozen=True)
class _State:
    loaded: bool = False
    failed: bool = False


class OpaServerEngine:
    """Decisions from an OPA server, with the repository's policies pushed to it.

    ``url`` is the server's base URL (loopback in tests and in the sidecar deployment).
    ``timeout`` (seconds) bounds every call: connect, write, read and waiting for a pooled
    connection. At construction the policies are pushed (unless ``push_policies`` is false,
    e.g. when the server loads a bundle) and an empty request is evaluated once, so a server
    that is down or rejects the policies stops the gateway at startup.
    """

    name: str = "opa"

    def __init__(
        self,
        url: str = DEFAULT_OPA_URL,
        policy_dir: str | os.PathLike[str] | None = None,
        *,
        data: Mapping[str, Any] | None = None,
        timeout: float = 1.0,
        push_policies: bool = True,
        entrypoint: str = DECISION_ENTRYPOINT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not timeout > 0:
            raise PolicyEngineError("the OPA timeout must be positive")
        directory = policies_dir() if policy_dir is None else Path(policy_dir)
        self._sources = load_policy_sources(directory)
        self._version = policy_version(self._sources)
        self._decision_path = f"/v1/data/{_data_path(entrypoint)}"
        self._client = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            transport=transport,
            trust_env=False,  # never through a proxy from the environment
            follow_redirects=False,
        )
        self._write_lock = threading.Lock()
        self._state = _State()
        try:
            if push_policies:
                self._push_policies()
            self._evaluate({}, stage="load")
            if data is not None:
                self.set_data(data)
        except BaseException:
            self._client.close()
            raise

    @property
    def version(self) -> str:
        return self._version

    def ready(self) -> bool:
        state = self._state
        return state.loaded and not state.failed

    def close(self) -> None:
        self._client.close()

    def set_data(self, data: Mapping[str, Any]) -> None:
        """Replace the whole data document on the server. On any failure the engine fails
        closed (every decision raises) until a good document is set."""
        with self._write_lock:
            failed = _State(failed=True)
            try:
                body = encode_data(data)
            except PolicyEngineError:
                self._state = failed
                raise
            try:
                # The root document, replaced whole (policies are stored apart from data).
                self._call("PUT", "/v1/data", body, stage="data", expect=(204, 200))
                self._evaluate({}, stage="data")
            except PolicyEngineError:
                self._state = failed
                raise
            self._state = _State(loaded=True)

    def decide(self, policy_input: Mapping[str, Any]) -> Decision:
        if self._state.failed:
            raise PolicyEngineError("the policy data could not be loaded")
        if not is_mapping(policy_input):
            raise PolicyEngineError("the policy input must be a JSON object")
        document = self._evaluate(policy_input, stage="decide")
        return decision_from_document(document, policy_version=self._version, engine=self.name)

    # --- internals ---------------------------------------------------------------------

    def _push_policies(self) -> None:
        for source in self._sources:
            policy_id = quote(_POLICY_ID_PREFIX + source.path, safe="")
            response = self._call(
                "PUT",
                f"/v1/policies/{policy_id}",
                source.text,
                stage="load",
                expect=None,
                content_type="text/plain",
            )
            if response.status_code != 200:
                self._log("load", f"HTTP {response.status_code} for {source.path}")
                raise PolicyEngineError(
                    f"the OPA server did not accept policy {source.path}"
                    f" (HTTP {response.status_code})"
                )

    def _evaluate(self, policy_input: Mapping[str, Any], *, stage: str) -> object:
        try:
            body = ENCODER.encode({"input": policy_input})
        except (TypeError, ValueError):
            raise PolicyEngineError("the policy input is not a JSON document") from None
        response = self._call("POST", self._decision_path, body, stage=stage, expect=(200,))
        try:
            answer = response.json()
        except ValueError:
            self._log(stage, "malformed JSON")
            raise PolicyEngineError("the OPA server answered malformed JSON") from None
        if not isinstance(answer, dict):
            self._log(stage, "answer is not an object")
            raise PolicyEngineError("the OPA server answered malformed JSON")
        # No "result" member: the decision is undefined (e.g. the server lost its policies).
        return answer.get("result", UNDEFINED)

    def _call(
        self,
        method: str,
        path: str,
        body: str,
        *,
        stage: str,
        expect: tuple[int, ...] | None,
        content_type: str = "application/json",
    ) -> httpx.Response:
        try:
            response = self._client.request(
                method, path, content=body.encode("utf-8"), headers={"Content-Type": content_type}
            )
        except httpx.TimeoutException:
            self._log(stage, "timeout")
            raise PolicyEngineError("the OPA server did not answer in time") from None
        except httpx.HTTPError as exc:
            self._log(stage, type(exc).__name__)
            raise PolicyEngineError("the OPA server cannot be reached") from None
        if expect is not None and response.status_code not in expect:
            self._log(stage, f"HTTP {response.status_code}")
            raise PolicyEngineError(
                f"the OPA server answered HTTP {response.status_code} to {method} {path}"
            )
        return response

    def _log(self, stage: str, what: str) -> None:
        logger.error("policy engine %s failed during %s: %s", self.name, stage, what)


register_engine("opa", OpaServerEngine)
