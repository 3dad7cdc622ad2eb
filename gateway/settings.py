"""Runtime settings (environment variables prefixed ``GATEWAY_``).

Everything lives under one work directory by default; outside demo mode the gateway refuses to
start with keys it would have to invent, so a production deployment mounts its own.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    workdir: Path = Path(".gateway/demo")
    base_url: str = "http://127.0.0.1:8000"
    demo: bool = False
    policy_engine: str = "regorus"
    policy_dir: Path | None = None
    catalog_path: Path | None = None
    token_ttl_s: int = Field(default=600, ge=30, le=3600)
    query_timeout_s: float = Field(default=30.0, gt=0)
    query_memory_limit: str = "4GB"
    audit_origin: str = "yibao-gateway.local/audit"
    # Production topology (docs/deploy.md). None: the embedded SQLite files under workdir.
    state_url: str | None = None  # postgresql://... for grants, consents, replay, budgets
    audit_url: str | None = None  # postgresql://... for the audit log
    opa_url: str | None = None  # http://127.0.0.1:8181 when policy_engine == "opa"
    opa_timeout_s: float = Field(default=0.5, gt=0)
    policy_bundle_path: Path | None = None  # signed bundle built by `opa build --signing-key`
    policy_bundle_key_path: Path | None = None  # public key that verifies that bundle

    @property
    def token_url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/oauth/token"

    @property
    def keys_dir(self) -> Path:
        return self.workdir / "keys"

    @property
    def signing_key_path(self) -> Path:
        """Ed25519 key that signs access tokens and audit bundles (query side)."""
        return self.keys_dir / "gateway-signing.pem"

    @property
    def pseudonym_key_path(self) -> Path:
        """HMAC key of the ingest side; the serving process never opens it."""
        return self.keys_dir / "ingest-pseudonym.key"

    @property
    def consent_key_path(self) -> Path:
        """Ed25519 key that signs consent tokens (``consent+jwt``); its public JWK is in the
        state store's consent key registry and at ``/.well-known/jwks.json``."""
        return self.keys_dir / "consent-signing.pem"

    @property
    def consent_pairwise_key_path(self) -> Path:
        """32-byte HMAC key of the pairwise subjects (``sub``) of consent tokens."""
        return self.keys_dir / "consent-pairwise.key"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "store"

    @property
    def state_path(self) -> Path:
        return self.workdir / "state.sqlite"

    @property
    def audit_path(self) -> Path:
        return self.workdir / "audit.sqlite"
