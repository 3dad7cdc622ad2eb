"""``gateway demo``: a synthetic city, loaded, granted and served, with credentials on disk.

Idempotent: re-running with the same ``--persons`` and ``--seed`` reuses the city, the loaded
version, the clients and the grant; a different city is generated and loaded anew.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.auth.keys import load_or_create_private_key, public_key_pem
from gateway.auth.tokens import Principal
from gateway.cli.clients import register_client
from gateway.consent.keys import jwk_thumbprint, public_jwk
from gateway.ingest.pseudonym import load_or_create_key
from gateway.service.consents import IDENTITY_PUBLIC_KEY_FILE, LOOKUP_KEY_FILE
from gateway.settings import Settings
from gateway.state.store import SqliteStateStore

__all__ = ["DEMO_CLIENTS", "mint_subject_token", "prepare_demo", "run_demo"]

# role key in credentials.json -> (client id, role, org, alg)
DEMO_CLIENTS: dict[str, tuple[str, str, str | None, str]] = {
    "admin": ("demo-admin", "admin", None, "EdDSA"),
    "insurer": ("demo-insurer", "insurer", "ins-hmb-001", "EdDSA"),
    "insurer_b": ("demo-insurer-b", "insurer", "ins-other-002", "ES256"),
    "auditor": ("demo-auditor", "auditor", None, "EdDSA"),
}

PRICING_GRANT: dict[str, Any] = {
    "insurer": "ins-hmb-001",
    "purpose": "hmb_pricing",
    "datasets": ["settlements", "person_years"],
    "dimensions": ["age_band", "gend", "insu_admdvs", "insutype", "year", "med_type", "hosp_lv"],
    "measures": [
        "medfee_sumamt", "inscp_scp_amt", "fulamt_ownpay_amt", "overlmt_selfpay", "hifp_pay",
        "hifmi_pay", "psn_part_amt", "exposure", "setl_cnt",
    ],
    "min_cell_size": 10,
    "rate_limit_per_minute": 6000,
}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_demo(*, persons: int, seed: int, port: int, workdir: Path) -> dict[str, Any]:
    """Everything but serving; returns the credentials document it wrote."""
    from gateway.ingest.pipeline import ingest
    from gateway.query.store import StoreLayout
    from gateway.service.bootstrap import build_gateway
    from gateway.service.grants import GrantRequest
    from gateway.synth import generate_city

    workdir = workdir.resolve()
    settings = Settings(workdir=workdir, base_url=f"http://127.0.0.1:{port}", demo=True)
    workdir.mkdir(parents=True, exist_ok=True)
    load_or_create_private_key(settings.signing_key_path, "EdDSA")
    key = load_or_create_key(settings.pseudonym_key_path)
    load_or_create_private_key(settings.consent_key_path, "EdDSA")
    load_or_create_key(settings.consent_pairwise_key_path)
    # The consent service's certno lookup key, and a stand-in for the agency's identity
    # service: its private key under idp/ (the gateway reads only the public half).
    lookup_key = load_or_create_key(settings.keys_dir / LOOKUP_KEY_FILE)
    idp_key = load_or_create_private_key(workdir / "idp" / "identity-service.pem", "EdDSA")
    (settings.keys_dir / IDENTITY_PUBLIC_KEY_FILE).write_text(public_key_pem(idp_key), "ascii")

    raw = workdir / "raw"
    marker = raw / "city.json"
    wanted = {"persons": persons, "seed": seed, "certno_lookup": True}
    city_changed = not marker.exists() or json.loads(marker.read_text()) != wanted
    if city_changed:
        _say(f"[1/4] generating a synthetic city of {persons:,} persons (seed {seed})")
        started = time.perf_counter()
        files = generate_city(raw, persons=persons, seed=seed, progress=True)
        marker.write_text(json.dumps(wanted))
        _say(f"      {files.settlement_count:,} settlements in "
             f"{time.perf_counter() - started:.1f} s")
    else:
        _say("[1/4] reusing the synthetic city in " + str(raw))
    layout = StoreLayout(settings.store_dir)
    if city_changed or layout.current_version() is None:
        _say("[2/4] de-identifying and loading into DuckDB")
        report = ingest(raw / "persons.parquet", raw / "settlements.parquet",
                        store_dir=settings.store_dir, key=key, lookup_key=lookup_key,
                        progress=lambda step: _say(f"      · {step}"))
        _say(f"      version {report.data_version}: {report.settlements:,} settlements in "
             f"{report.seconds:.1f} s ({report.settlement_rows_per_s:,.0f} rows/s)")
    else:
        _say(f"[2/4] serving loaded version {layout.current_version()}")

    _say("[3/4] clients and grants")
    state = SqliteStateStore(settings.state_path)
    clients: dict[str, Any] = {}
    for name, (client_id, role, org, alg) in DEMO_CLIENTS.items():
        key_path = settings.workdir / "clients" / f"{client_id}.pem"
        if state.get_client(client_id) is None or not key_path.exists():
            if state.get_client(client_id) is not None:
                raise SystemExit(f"client {client_id} exists but its key is gone; "
                                 f"remove {workdir} and run the demo again")
            register_client(settings, client_id=client_id, role=role, org=org, alg=alg,
                            key_path=key_path)
        clients[name] = {"client_id": client_id, "role": role, "org": org,
                         "private_key_path": str(key_path), "alg": alg}
        if role == "insurer":
            # The insurer's DPoP key (RFC 9449): consents are bound to its thumbprint.
            dpop_path = settings.workdir / "clients" / f"{client_id}-dpop.pem"
            dpop = load_or_create_private_key(dpop_path, "EdDSA")
            clients[name]["dpop_key_path"] = str(dpop_path)
            clients[name]["dpop_jkt"] = jwk_thumbprint(public_jwk(dpop.public_key()))
    now_ns = time.time_ns()
    live = [g for g in state.list_grants("ins-hmb-001")
            if g.revoked_at_ns is None and g.valid_until_ns > now_ns]
    if not live:
        gateway = build_gateway(settings)
        try:
            admin = Principal(client_id="demo-admin", role="admin", org=None,
                              token_id="demo")  # noqa: S106 - an id, not a secret
            request = GrantRequest.model_validate({
                **PRICING_GRANT,
                "valid_until": (datetime.now(UTC) + timedelta(days=365)).isoformat(),
            })
            grant = gateway.create_grant(admin, request).body
            _say(f"      granted {grant['grant_id']} ({grant['purpose']}) to ins-hmb-001")
        finally:
            gateway.audit.close()
    credentials = {"base_url": settings.base_url, "token_url": settings.token_url,
                   "clients": clients, "persons": _sample_persons(raw / "persons.parquet",
                                                                  workdir)}
    cred_path = workdir / "credentials.json"
    fd = os.open(cred_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(credentials, fh, ensure_ascii=False, indent=2)
    return credentials


def _sample_persons(persons_file: Path, workdir: Path, count: int = 3) -> list[dict[str, Any]]:
    """A few enrolled synthetic persons, named by 身份证号 as the agency would, with the command
    that signs them in (subject role)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(persons_file, columns=["certno", "insu_end_date"])
    enrolled = table.filter(pc.is_null(table.column("insu_end_date"))).slice(0, count)
    return [{"certno": certno,
             "subject_token": f"gateway token subject {certno} --workdir {workdir}"}
            for certno in enrolled.column("certno").to_pylist()]


def mint_subject_token(workdir: Path, certno: str, *, lifetime_s: int = 900) -> str:
    """What the agency's identity service would sign for this person (demo only)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.auth.keys import load_private_key
    from gateway.auth.subjects import issue_subject_token
    from gateway.consent.lookup import certno_lookup

    settings = Settings(workdir=workdir.resolve())
    key = load_private_key(workdir / "idp" / "identity-service.pem")
    if not isinstance(key, Ed25519PrivateKey):
        raise SystemExit("the demo identity service key must be Ed25519")
    lookup_key = load_or_create_key(settings.keys_dir / LOOKUP_KEY_FILE)
    base_url = json.loads((workdir / "credentials.json").read_text("utf-8"))["base_url"]
    return issue_subject_token(key, lookup=certno_lookup(lookup_key, certno),
                               audience=base_url, lifetime_s=lifetime_s)


_EXAMPLES = """
[4/4] gateway on {base_url}   (credentials: {cred})

  # an access token for the demo insurer (RFC 7523 client assertion, signed with its key)
  TOKEN=$(gateway token get insurer --credentials {cred})

  curl -s {base_url}/v1/catalog -H "Authorization: Bearer $TOKEN"

  curl -s {base_url}/v1/query/aggregate -H "Authorization: Bearer $TOKEN" \\
       -H 'Content-Type: application/json' -d '{{"purpose": "hmb_pricing",
       "dataset": "settlements", "dimensions": ["age_band", "gend"],
       "measures": [{{"fn": "count_persons"}}, {{"fn": "sum", "field": "psn_part_amt"}},
                    {{"fn": "mean", "field": "medfee_sumamt"}}],
       "filters": {{"year": [2024], "med_type": ["21"]}}}}'

  # Python
  import httpx, json
  from pathlib import Path
  from gateway.cli.clients import fetch_token
  token = fetch_token(Path("{cred}"), "insurer")
  r = httpx.post("{base_url}/v1/query/aggregate",
                 headers={{"Authorization": f"Bearer {{token}}"}},
                 json={{"purpose": "hmb_pricing", "dataset": "person_years",
                       "dimensions": ["age_band"],
                       "measures": [{{"fn": "sum", "field": "exposure"}},
                                    {{"fn": "mean", "field": "psn_part_amt"}}]}})
  print(json.dumps(r.json(), ensure_ascii=False, indent=1))

  # Individual consent (投保身份校验 / 线上快速理赔): persons and DPoP keys are in {cred}
  python -m gateway.cli.clients walkthrough {cred}
  #   admin consents on a person's behalf (by 身份证号), the insurer checks enrollment and
  #   reads settlements with Consent + DPoP, the person lists every access and revokes.
  # A person's own sign-in token (subject role):
  gateway token subject <certno from credentials.json> --workdir {workdir}
  curl -s {base_url}/v1/subjects/me/access -H "Authorization: Bearer $SUBJECT_TOKEN"

  OpenAPI: {base_url}/docs    Stop with Ctrl-C.
"""


def run_demo(*, persons: int, seed: int, port: int, workdir: Path, serve: bool) -> None:
    credentials = prepare_demo(persons=persons, seed=seed, port=port, workdir=workdir)
    cred = (workdir.resolve() / "credentials.json")
    _say(_EXAMPLES.format(base_url=credentials["base_url"], cred=cred,
                          workdir=workdir.resolve()))
    if not serve:
        return
    import uvicorn

    from gateway.api.app import create_app, settle_heap
    from gateway.service.bootstrap import build_gateway

    settings = Settings(workdir=workdir.resolve(), base_url=credentials["base_url"], demo=True)
    application = create_app(build_gateway(settings))
    settle_heap()
    uvicorn.run(application, host="127.0.0.1", port=port, log_level="warning",
                access_log=False)
