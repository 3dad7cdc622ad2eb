"""``gateway`` command line: serve, demo, init, ingest, grant, token, audit.

Errors map to exit codes in one place (:func:`main`): a :class:`GatewayError` prints its code
and message on stderr and exits with its ``exit_code``; nothing prints a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.errors import GatewayError

__all__ = ["app", "main"]

app = typer.Typer(help="医保商保数据共享网关 — privacy-preserving data-sharing gateway",
                  no_args_is_help=True, pretty_exceptions_enable=False)
grant_app = typer.Typer(help="Manage grants (scopes) of insurers", no_args_is_help=True)
token_app = typer.Typer(help="Client keys and access tokens", no_args_is_help=True)
audit_app = typer.Typer(help="Export and verify the audit log", no_args_is_help=True)
app.add_typer(grant_app, name="grant")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
consent_app = typer.Typer(help="Individual consent: the consent signing keys",
                          no_args_is_help=True)
consent_keys_app = typer.Typer(help="Rotate the consent signing keys (every change audited)",
                               no_args_is_help=True)
consent_app.add_typer(consent_keys_app, name="keys")
app.add_typer(consent_app, name="consent")
policy_app = typer.Typer(help="Signed policy bundles (tools/build-bundle.sh builds them)",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")

Workdir = Annotated[Path, typer.Option("--workdir", help="gateway work directory")]
_DEFAULT_WORKDIR = Path(".gateway/demo")


def _settings(workdir: Path, **extra: Any) -> Any:
    from gateway.settings import Settings

    return Settings(workdir=workdir, **extra)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


@app.command()
def init(workdir: Workdir = _DEFAULT_WORKDIR) -> None:
    """Create the gateway signing key, the ingest pseudonym key and the consent keys (if
    absent)."""
    from gateway.auth.keys import load_or_create_private_key
    from gateway.ingest.pseudonym import load_or_create_key

    settings = _settings(workdir)
    load_or_create_private_key(settings.signing_key_path, "EdDSA")
    load_or_create_key(settings.pseudonym_key_path)
    load_or_create_private_key(settings.consent_key_path, "EdDSA")
    load_or_create_key(settings.consent_pairwise_key_path)
    typer.echo(f"keys ready under {settings.keys_dir}")


@app.command()
def ingest(
    persons: Annotated[Path, typer.Argument(help="参保人 extract (.parquet or .csv)")],
    settlements: Annotated[Path, typer.Argument(help="结算 extract (.parquet or .csv)")],
    workdir: Workdir = _DEFAULT_WORKDIR,
) -> None:
    """De-identify and load extracts as a new data version (atomic)."""
    from gateway.ingest.pipeline import ingest as run_ingest
    from gateway.ingest.pseudonym import load_or_create_key
    from gateway.service.consents import LOOKUP_KEY_FILE

    settings = _settings(workdir)
    key = load_or_create_key(settings.pseudonym_key_path)
    # The consent service's certno lookup key (not the ingest key): the keyed lookup table.
    lookup_key = load_or_create_key(settings.keys_dir / LOOKUP_KEY_FILE)
    report = run_ingest(persons, settlements, store_dir=settings.store_dir, key=key,
                        lookup_key=lookup_key,
                        progress=lambda step: typer.echo(f"  · {step}", err=True))
    _print_json({
        "data_version": report.data_version,
        "persons": report.persons,
        "settlements": report.settlements,
        "person_years": report.person_years,
        "unplaced_addresses": report.unplaced_addresses,
        "seconds": round(report.seconds, 2),
        "settlement_rows_per_s": round(report.settlement_rows_per_s),
    })


@app.command()
def serve(
    workdir: Workdir = _DEFAULT_WORKDIR,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    base_url: Annotated[str | None, typer.Option(help="public base URL")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="worker processes sharing the port and the state (uvicorn)")] = 1,
) -> None:
    """Serve the gateway API (uvicorn). With --workers N, N processes each accept on a
    listener of their own (one SO_REUSEPORT group) and hand a new connection to the worker
    holding the fewest (gateway.cli.balancing); they
    share grants, consents, replay stores and the audit log through the state store
    (GATEWAY_STATE_URL=postgresql://… in production, or the SQLite files of one machine)."""
    import os
    import tempfile

    import uvicorn

    from gateway.api.app import create_app, settle_heap
    from gateway.cli.listeners import ReusePortListener, WorkerGroup, reuse_port_supported
    from gateway.service.bootstrap import build_gateway

    settings = _settings(workdir, base_url=base_url or f"http://{host}:{port}")
    # Built here even with workers, so a bad configuration fails before any process starts
    # and migrations run once.
    gateway = build_gateway(settings)
    if workers == 1:
        application = create_app(gateway)
        settle_heap()
        uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False)
        return
    gateway.audit.close()
    gateway.state.close()
    # Spawned workers rebuild their gateway from the environment (see worker_app).
    os.environ["GATEWAY_WORKDIR"] = str(workdir)
    os.environ["GATEWAY_BASE_URL"] = settings.base_url
    from uvicorn.supervisors import Multiprocess

    def config(**options: Any) -> uvicorn.Config:
        return uvicorn.Config("gateway.cli.main:worker_app", factory=True, workers=workers,
                              host=host, port=port, log_level="warning", access_log=False,
                              **options)

    if not reuse_port_supported():  # uvicorn's one shared socket: the kernel balances nothing
        shared = config()
        Multiprocess(shared, sockets=[shared.bind_socket()]).run()
        return
    # A listener per worker (gateway.cli.listeners), under uvicorn's own supervisor; the
    # workers even out the kernel's split by handing connections over (gateway.cli.balancing).
    with tempfile.TemporaryDirectory(prefix="gateway-workers-") as group_dir:
        group = WorkerGroup(Path(group_dir), workers)
        try:
            listener = ReusePortListener(host, port, group)
        except OSError as exc:
            raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        with listener:
            Multiprocess(config(loop="gateway.cli.balancing:BalancingLoop"),
                         sockets=[listener]).run()


def worker_app() -> Any:
    """The ASGI app of one worker process (uvicorn ``factory``): its own gateway, connections
    and audit sequencer, configured from the ``GATEWAY_*`` environment."""
    from gateway.api.app import create_app, settle_heap
    from gateway.service.bootstrap import build_gateway
    from gateway.settings import Settings

    application = create_app(build_gateway(Settings()))
    settle_heap()
    return application


@app.command()
def demo(
    persons: Annotated[int, typer.Option(help="synthetic persons")] = 100_000,
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workdir: Workdir = _DEFAULT_WORKDIR,
    serve_forever: Annotated[bool, typer.Option("--serve/--no-serve",
                                                help="serve after setting up")] = True,
) -> None:
    """Build a synthetic city, load it, create demo clients and a grant, and serve."""
    from gateway.cli.demo import run_demo

    run_demo(persons=persons, seed=seed, port=port, workdir=workdir, serve=serve_forever)


# -- grants -------------------------------------------------------------------------------
@contextmanager
def _cli_gateway(workdir: Path) -> Iterator[Any]:
    """The gateway's use cases, run locally by the operator (audited like API calls)."""
    from gateway.service.bootstrap import build_gateway

    gateway = build_gateway(_settings(workdir))
    try:
        yield gateway
    finally:
        gateway.audit.close()


def _cli_admin() -> Any:
    import getpass

    from gateway.auth.tokens import Principal

    return Principal(client_id=f"cli:{getpass.getuser()}", role="admin", org=None,
                     token_id="cli")  # noqa: S106 - an id, not a secret


@grant_app.command("create")
def grant_create(
    spec: Annotated[Path, typer.Argument(help="grant request as a JSON file")],
    workdir: Workdir = _DEFAULT_WORKDIR,
) -> None:
    """Create a grant from a JSON request (same shape as POST /v1/grants)."""
    from gateway.service.grants import GrantRequest

    request = GrantRequest.model_validate_json(spec.read_text("utf-8"))
    with _cli_gateway(workdir) as gateway:
        _print_json(gateway.create_grant(_cli_admin(), request).body)


@grant_app.command("list")
def grant_list(
    workdir: Workdir = _DEFAULT_WORKDIR,
    insurer: Annotated[str | None, typer.Option(help="only this insurer")] = None,
) -> None:
    """List grants."""
    with _cli_gateway(workdir) as gateway:
        _print_json(gateway.list_grants(_cli_admin(), insurer).body)


@grant_app.command("revoke")
def grant_revoke(grant_id: str, workdir: Workdir = _DEFAULT_WORKDIR) -> None:
    """Revoke a grant; it stops working from the next request."""
    with _cli_gateway(workdir) as gateway:
        _print_json(gateway.revoke_grant(_cli_admin(), grant_id).body)


# -- clients and tokens ---------------------------------------------------------------------
@token_app.command("register")
def token_register(
    client_id: Annotated[str, typer.Argument(help="client id to create")],
    role: Annotated[str, typer.Option(help="admin | insurer | auditor")],
    key_out: Annotated[Path, typer.Option(help="where to write the client's private key")],
    org: Annotated[str | None, typer.Option(help="insurer organisation id")] = None,
    alg: Annotated[str, typer.Option(help="EdDSA or ES256")] = "EdDSA",
    workdir: Workdir = _DEFAULT_WORKDIR,
) -> None:
    """Create a client key pair and register its public key."""
    from gateway.cli.clients import register_client

    register_client(_settings(workdir), client_id=client_id, role=role, org=org,
                    alg=alg, key_path=key_out)
    typer.echo(f"registered {client_id} ({role}); private key at {key_out}")


@token_app.command("get")
def token_get(
    role: Annotated[str, typer.Argument(help="role in credentials.json")] = "insurer",
    credentials: Annotated[Path, typer.Option(help="credentials.json of the demo")] = (
        _DEFAULT_WORKDIR / "credentials.json"
    ),
) -> None:
    """Fetch an access token from a running gateway (for curl)."""
    from gateway.cli.clients import fetch_token

    typer.echo(fetch_token(credentials, role))


@token_app.command("subject")
def token_subject(
    certno: Annotated[str, typer.Argument(help="the person's 身份证号 (demo persons are in "
                                               "credentials.json)")],
    workdir: Workdir = _DEFAULT_WORKDIR,
    lifetime_s: Annotated[int, typer.Option(help="token lifetime, at most 3600 s")] = 900,
) -> None:
    """Mint a subject sign-in token as the demo's identity service would (its key is under
    WORKDIR/idp/; a real deployment's identity service signs these)."""
    from gateway.cli.demo import mint_subject_token

    typer.echo(mint_subject_token(workdir, certno, lifetime_s=lifetime_s))


# -- consent keys -------------------------------------------------------------------------------
@consent_keys_app.command("list")
def consent_keys_list(workdir: Workdir = _DEFAULT_WORKDIR) -> None:
    """Every consent key with its state (pending, active, retired)."""
    with _cli_gateway(workdir) as gateway:
        _print_json(gateway.consent_keys(_cli_admin()).body)


@consent_keys_app.command("rotate")
def consent_keys_rotate(workdir: Workdir = _DEFAULT_WORKDIR) -> None:
    """Add a new key, pending: published in the JWKS at once, signing nothing until
    `activate` (after verifiers have refreshed the JWKS, max-age 300 s)."""
    with _cli_gateway(workdir) as gateway:
        _print_json(gateway.change_consent_key(_cli_admin(), "add").body)


@consent_keys_app.command("activate")
def consent_keys_activate(
    kid: str,
    workdir: Workdir = _DEFAULT_WORKDIR,
    min_pending_s: Annotated[float, typer.Option(
        help="refuse unless the key was published at least this long ago")] = 300.0,
) -> None:
    """Make a pending key the signing key (older active keys keep verifying)."""
    with _cli_gateway(workdir) as gateway:
        _print_json(gateway.change_consent_key(_cli_admin(), "activate", kid,
                                               min_pending_s=min_pending_s).body)


@consent_keys_app.command("retire")
def consent_keys_retire(kid: str, workdir: Workdir = _DEFAULT_WORKDIR) -> None:
    """Retire a key: out of the JWKS, verifying nothing from the next request, in every
    worker. Tokens it signed must be reissued."""
    with _cli_gateway(workdir) as gateway:
        _print_json(gateway.change_consent_key(_cli_admin(), "retire", kid).body)


# -- audit ------------------------------------------------------------------------------------
@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Argument(help="bundle file to write")],
    workdir: Workdir = _DEFAULT_WORKDIR,
    with_personal: Annotated[bool, typer.Option(
        "--with-personal", help="also carry each entry's personal part (pseudonym, consent "
        "id) where not erased; without it the bundle holds no personal data")] = False,
) -> None:
    """Export the whole log as a signed bundle for offline verification."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.audit import export_bundle, open_audit_log
    from gateway.auth.keys import load_private_key, public_key_pem

    settings = _settings(workdir)
    key = load_private_key(settings.signing_key_path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise GatewayError("the gateway signing key must be Ed25519")
    with open_audit_log(settings.audit_url, settings.audit_path) as log:
        export_bundle(log, out, key, origin=settings.audit_origin, with_personal=with_personal)
    pub = out.with_suffix(".pub.pem")
    pub.write_text(public_key_pem(key), "ascii")
    typer.echo(f"wrote {out} and its public key {pub}")


@audit_app.command("erase")
def audit_erase(
    subject: Annotated[str, typer.Option(help="the person's subject pseudonym")],
    workdir: Workdir = _DEFAULT_WORKDIR,
) -> None:
    """Erase a person's personal data from the audit log (their pseudonym and consent ids
    beside each leaf); the leaves, proofs and bundles still verify. The erasure is itself
    audited (action ``audit.erase``: the indexes erased, never the pseudonym)."""
    with _cli_gateway(workdir) as gateway:
        indexes = gateway.audit.erase_subject(subject)
        audit_id = gateway.record(_cli_admin(), "audit.erase", status=200, decision="allow",
                                  request={"erased_indexes": indexes})
    _print_json({"erased": len(indexes), "indexes": indexes, "audit_id": audit_id})


@audit_app.command("verify")
def audit_verify(
    bundle: Annotated[Path, typer.Argument(help="exported audit bundle")],
    public_key: Annotated[Path, typer.Option(help="the gateway's public key (PEM)")],
    previous_checkpoint: Annotated[Path | None, typer.Option(
        help="a checkpoint saved earlier: the bundle must extend it")] = None,
    save_checkpoint: Annotated[Path | None, typer.Option(
        help="write the verified checkpoint here, to check the next bundle against")] = None,
) -> None:
    """Check an exported log offline: every leaf, the chain, the Merkle root, the signed
    checkpoint, and consistency with a checkpoint saved earlier."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.audit.bundle import verify_bundle_checkpoint
    from gateway.auth.keys import load_public_key_pem

    key, _ = load_public_key_pem(public_key.read_text("ascii"))
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise GatewayError("the audit public key must be Ed25519")
    previous = previous_checkpoint.read_text("utf-8") if previous_checkpoint else None
    verified = verify_bundle_checkpoint(bundle, key, previous_checkpoint=previous)
    if save_checkpoint is not None and verified.checkpoint is not None:
        save_checkpoint.write_text(verified.checkpoint, "utf-8")
    typer.echo(f"OK: {verified.size} entries verified at {datetime.now(UTC).isoformat()}")


@audit_app.command("report")
def audit_report(
    out: Annotated[Path, typer.Option("--out", help="file to write")],
    workdir: Workdir = _DEFAULT_WORKDIR,
    since: Annotated[str | None, typer.Option(
        help="from (inclusive): YYYY-MM-DD (local midnight) or RFC 3339")] = None,
    until: Annotated[str | None, typer.Option(help="to (exclusive), like --since")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv | svg | html | json")] = "html",
    kind: Annotated[str, typer.Option(
        help="CSV table: access | refusals | persons")] = "access",
    bucket: Annotated[str, typer.Option(help="day | hour")] = "day",
) -> None:
    """Write an auditor report read straight from the local audit log file. An operator's
    tool: whoever can read the work directory can read the log, so no policy decision is made
    and no audit entry is written (the API's GET /v1/audit/report does both)."""
    from gateway.audit import open_audit_log
    from gateway.service.monitoring import report_content

    settings = _settings(workdir)
    if settings.audit_url is None and not settings.audit_path.exists():
        raise GatewayError(f"no audit log at {settings.audit_path}")
    with open_audit_log(settings.audit_url, settings.audit_path) as log:
        content = report_content(log, since, until, bucket, kind, fmt)
    text = (json.dumps(content, ensure_ascii=False, indent=2) + "\n"
            if isinstance(content, dict) else content)
    out.write_text(text, "utf-8", newline="")
    typer.echo(f"wrote {out}")


@audit_app.command("witness")
def audit_witness(
    log_key: Annotated[Path, typer.Option(help="the gateway's audit public key (PEM)")],
    witness_key: Annotated[Path, typer.Option(help="this witness's Ed25519 private key (PEM)")],
    state: Annotated[Path, typer.Option(help="file keeping the last checkpoint accepted")],
    name: Annotated[str, typer.Option(help="this witness's key name")] = "witness",
    credentials: Annotated[Path, typer.Option(help="credentials.json of an auditor client")] = (
        _DEFAULT_WORKDIR / "credentials.json"
    ),
    role: Annotated[str, typer.Option(help="client in the credentials file")] = "auditor",
    origin: Annotated[str, typer.Option(help="the log's origin line")] = (
        "yibao-gateway.local/audit"
    ),
) -> None:
    """Fetch the gateway's checkpoint, check it extends the last one this witness accepted
    (consistency proof), countersign it and print the cosigned note."""
    import base64

    import httpx
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.audit.witness import WitnessState, witness_checkpoint
    from gateway.auth.keys import load_or_create_private_key, load_public_key_pem
    from gateway.cli.clients import fetch_token

    public, _ = load_public_key_pem(log_key.read_text("ascii"))
    own = load_or_create_private_key(witness_key, "EdDSA")
    if not isinstance(public, ed25519.Ed25519PublicKey) or not isinstance(
        own, ed25519.Ed25519PrivateKey
    ):
        raise GatewayError("log and witness keys must be Ed25519")
    base_url = json.loads(credentials.read_text("utf-8"))["base_url"]
    token = fetch_token(credentials, role)
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as http:
        response = http.get("/v1/audit/checkpoint")
        if response.status_code != 200:
            raise GatewayError(f"checkpoint request failed with HTTP {response.status_code}")

        def consistency(first: int, second: int) -> list[bytes]:
            answer = http.get("/v1/audit/proof/consistency",
                              params={"first": first, "second": second})
            if answer.status_code != 200:
                raise GatewayError(f"consistency proof failed with HTTP {answer.status_code}")
            return [base64.b64decode(h) for h in answer.json()["proof"]]

        cosigned, new_state = witness_checkpoint(
            response.text, log_key=public, origin=origin, previous=WitnessState.load(state),
            fetch_consistency=consistency, witness_key=own, witness_name=name)
    new_state.save(state)
    typer.echo(cosigned, nl=False)


@policy_app.command("keygen")
def policy_keygen(
    private_key: Annotated[Path, typer.Argument(help="new private key (PEM, mode 0600)")],
    public_key: Annotated[Path, typer.Argument(help="new public key (PEM)")],
) -> None:
    """A new P-256 key pair for signing policy bundles (ES256). Keep the private key with the
    build, never in the repository; give the public key to OPA and the gateway."""
    from gateway.policy.bundle import write_signing_key

    write_signing_key(private_key, public_key)
    typer.echo(f"bundle signing key {private_key}, verification key {public_key}")


@policy_app.command("verify")
def policy_verify(
    bundle: Annotated[Path, typer.Argument(help="the bundle (.tar.gz)")],
    key: Annotated[Path, typer.Option("--key", help="public key (PEM) that verifies it")],
) -> None:
    """Verify a signed policy bundle as the gateway does at start; print its revision."""
    from gateway.policy.bundle import load_bundle

    loaded = load_bundle(bundle, key)
    _print_json({"revision": loaded.revision, "roots": list(loaded.roots),
                 "policy_version": loaded.version,
                 "policies": [source.path for source in loaded.sources]})


def main() -> None:
    """Entry point: run the CLI, mapping gateway errors to exit codes."""
    try:
        app(standalone_mode=False)
    except GatewayError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit codes
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
