"""Build a :class:`Gateway` from settings: the composition root of the serving process."""

from __future__ import annotations

from gateway.audit.backends import open_audit_log
from gateway.auth.keys import load_private_key
from gateway.auth.tokens import AccessTokenIssuer
from gateway.catalog import default_catalog, load_catalog
from gateway.errors import ValidationFailed
from gateway.policy.configure import engine_from_settings
from gateway.query.store import QueryStore, StoreLayout
from gateway.service.consents import load_consent_config
from gateway.service.gateway import Gateway
from gateway.settings import Settings
from gateway.state.store import open_state_store

__all__ = ["build_gateway"]


def build_gateway(settings: Settings) -> Gateway:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if not settings.signing_key_path.exists():
        raise ValidationFailed(
            "no gateway signing key: run `gateway init` or `gateway demo` first"
        )
    signing_key = load_private_key(settings.signing_key_path)
    if not isinstance(signing_key, ed25519.Ed25519PrivateKey):
        raise ValidationFailed("the gateway signing key must be Ed25519")
    catalog = load_catalog(settings.catalog_path) if settings.catalog_path else default_catalog()
    state = open_state_store(settings.state_url, settings.state_path)  # postgresql:// or SQLite
    policy = engine_from_settings(settings)  # regorus or OPA; a signed bundle or a directory
    store = QueryStore(
        StoreLayout(settings.store_dir),
        timeout_s=settings.query_timeout_s,
        memory_limit=settings.query_memory_limit,
    )
    audit = open_audit_log(settings.audit_url, settings.audit_path)
    tokens = AccessTokenIssuer(
        signing_key=signing_key,
        issuer=settings.base_url.rstrip("/"),
        token_url=settings.token_url,
        state=state,
        ttl_s=settings.token_ttl_s,
    )
    consent = load_consent_config(
        settings.consent_key_path, settings.consent_pairwise_key_path,
        issuer=settings.base_url.rstrip("/"), state=state,
    )
    return Gateway(catalog=catalog, state=state, policy=policy, store=store, audit=audit,
                   tokens=tokens, checkpoint_key=signing_key,
                   audit_origin=settings.audit_origin, consent=consent)
