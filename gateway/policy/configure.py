"""The policy engine the settings ask for (the service's composition root calls this)."""

from __future__ import annotations

from typing import Any

from gateway.errors import PolicyEngineError
from gateway.policy.bundle import load_bundle
from gateway.policy.engine import PolicyEngine, build_engine
from gateway.settings import Settings

__all__ = ["engine_from_settings"]


def engine_from_settings(settings: Settings) -> PolicyEngine:
    """``settings.policy_engine`` (``regorus``, the default, or ``opa`` at
    ``settings.opa_url`` with ``settings.opa_timeout_s``), loading the policies from the
    signed bundle at ``settings.policy_bundle_path`` (verified with
    ``settings.policy_bundle_key_path``; refused unsigned or wrongly signed) or else from
    ``settings.policy_dir`` (default: the repository's ``policies/``)."""
    options: dict[str, Any] = {}
    if settings.policy_bundle_path is not None:
        if settings.policy_dir is not None:
            raise PolicyEngineError("set a policy bundle or a policy directory, not both")
        options["bundle"] = load_bundle(
            settings.policy_bundle_path, settings.policy_bundle_key_path
        )
    elif settings.policy_dir is not None:
        options["policy_dir"] = settings.policy_dir
    if settings.policy_engine == "opa":
        if not settings.opa_url:
            raise PolicyEngineError("policy_engine opa needs opa_url (GATEWAY_OPA_URL)")
        options["url"] = settings.opa_url
        options["timeout"] = settings.opa_timeout_s
    return build_engine(settings.policy_engine, **options)
