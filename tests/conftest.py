"""Shared fixtures: one small seeded city, loaded once; a fresh gateway (state, audit, clients,
grant) per test, served in-process through FastAPI's TestClient or over a real socket."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.auth.keys import load_or_create_private_key, load_private_key, public_key_pem
from gateway.auth.tokens import ASSERTION_TYPE, make_client_assertion
from gateway.cli.clients import register_client
from gateway.ingest.pipeline import LoadReport, ingest
from gateway.service.bootstrap import build_gateway
from gateway.service.gateway import Gateway
from gateway.settings import Settings
from gateway.synth import CityFiles, generate_city
from tests.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)

CITY_PERSONS = 3000
CITY_SEED = 11
PSEUDONYM_KEY = bytes(range(32))
# The consent service's certno lookup key (apart from the ingest key) and the identity
# service's signing key (subject sign-in); the gateway holds only its public half.
LOOKUP_KEY = bytes(range(100, 132))
IDENTITY_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(200, 232)))
BASE_URL = "http://testserver"

PRICING_GRANT: dict[str, Any] = {
    "insurer": "ins-a",
    "purpose": "hmb_pricing",
    "datasets": ["settlements", "person_years"],
    "dimensions": ["age_band", "gend", "insu_admdvs", "insutype", "year", "med_type", "hosp_lv"],
    "measures": ["medfee_sumamt", "psn_part_amt", "fulamt_ownpay_amt", "inscp_scp_amt",
                 "exposure", "setl_cnt", "hifp_pay", "hifmi_pay", "overlmt_selfpay"],
    "min_cell_size": 10,
}

CLIENTS = {
    "admin": ("t-admin", "admin", None, "EdDSA"),
    "insurer": ("t-insurer", "insurer", "ins-a", "EdDSA"),
    "insurer_b": ("t-insurer-b", "insurer", "ins-b", "ES256"),
    "auditor": ("t-auditor", "auditor", None, "EdDSA"),
}


@dataclass
class FakeClock:
    """Wall time plus an offset the test moves forward (grant expiry without waiting)."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="session")
def city(tmp_path_factory: pytest.TempPathFactory) -> CityFiles:
    return generate_city(tmp_path_factory.mktemp("city"), persons=CITY_PERSONS, seed=CITY_SEED,
                         progress=False)


@dataclass(frozen=True)
class LoadedStore:
    store_dir: Path
    report: LoadReport


@pytest.fixture(scope="session")
def loaded_store(city: CityFiles, tmp_path_factory: pytest.TempPathFactory) -> LoadedStore:
    store_dir = tmp_path_factory.mktemp("store")
    report = ingest(city.persons, city.settlements, store_dir=store_dir, key=PSEUDONYM_KEY,
                    lookup_key=LOOKUP_KEY)
    return LoadedStore(store_dir=store_dir, report=report)


@pytest.fixture(scope="session")
def signing_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "gateway-signing.pem"
    load_or_create_private_key(path, "EdDSA")
    return path


@dataclass
class Env:
    settings: Settings
    gateway: Gateway
    client: TestClient
    clock: FakeClock
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    grant_id: str = ""

    def assertion(self, role: str, **overrides: Any) -> str:
        client_id, _, _, alg = CLIENTS[role]
        key = load_private_key(Path(self.credentials[role]["private_key_path"]))
        return make_client_assertion(key, client_id=overrides.get("client_id", client_id),
                                     token_url=overrides.get("aud", self.settings.token_url),
                                     alg=alg, lifetime_s=overrides.get("lifetime_s", 60))

    def token(self, role: str) -> str:
        response = self.client.post("/v1/oauth/token", data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(role),
        })
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role)}"}

    def aggregate(self, role: str, body: dict[str, Any]) -> Any:
        return self.client.post("/v1/query/aggregate", json=body, headers=self.headers(role))


def make_env(tmp_path: Path, store_dir: Path, signing_key_file: Path,
             grant: dict[str, Any] | None = PRICING_GRANT) -> Env:
    workdir = tmp_path / "gw"
    (workdir / "keys").mkdir(parents=True)
    shutil.copy(signing_key_file, workdir / "keys" / "gateway-signing.pem")
    load_or_create_private_key(workdir / "keys" / "consent-signing.pem", "EdDSA")
    (workdir / "keys" / "certno-lookup.key").write_bytes(LOOKUP_KEY)
    (workdir / "keys" / "identity-service.pub.pem").write_text(public_key_pem(IDENTITY_KEY))
    (workdir / "store").symlink_to(store_dir)
    settings = Settings(workdir=workdir, base_url=BASE_URL)
    credentials: dict[str, dict[str, Any]] = {}
    for role, (client_id, client_role, org, alg) in CLIENTS.items():
        key_path = workdir / "clients" / f"{client_id}.pem"
        register_client(settings, client_id=client_id, role=client_role, org=org, alg=alg,
                        key_path=key_path)
        credentials[role] = {"client_id": client_id, "private_key_path": str(key_path),
                             "alg": alg}
    clock = FakeClock()
    gateway = build_gateway(settings)
    gateway.clock = clock
    client = TestClient(create_app(gateway), base_url=BASE_URL)
    env = Env(settings=settings, gateway=gateway, client=client, clock=clock,
              credentials=credentials)
    if grant is not None:
        response = client.post("/v1/grants", json=grant, headers=env.headers("admin"))
        assert response.status_code == 201, response.text
        env.grant_id = response.json()["grant_id"]
    return env


@pytest.fixture
def env(tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path) -> Iterator[Env]:
    environment = make_env(tmp_path, loaded_store.store_dir, signing_key_file)
    with environment.client:
        yield environment
    environment.gateway.audit.close()
