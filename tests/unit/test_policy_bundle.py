"""Signed policy bundles: built by the real ``opa build`` (tools/build-bundle.sh), verified by
the gateway itself and by a real ``opa run --verification-key``; an unsigned, wrongly signed,
tampered, extended or truncated bundle is refused by both, with a clear reason."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.errors import PolicyEngineError
from gateway.policy import OpaServerEngine, RegorusEngine, load_bundle, policies_dir
from gateway.policy._sources import load_policy_sources, policy_version
from gateway.policy.bundle import bundle_file_digest, write_signing_key
from gateway.policy.configure import engine_from_settings
from gateway.settings import Settings
from tests.opa import OpaExited, OpaServer, build_bundle, opa_binary

READ = {"subject": {"role": "insurer", "org": "ins-001"}, "action": "catalog.read",
        "resource": {}}
DATA = {"gateway": {"catalog": {"defaults": {"min_cell_size": 10, "min_cell_size_floor": 5,
                                             "max_rows": 100}}, "grants": {}}}


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path
    other_private: Path
    other_public: Path


@dataclass(frozen=True)
class Built:
    keys: Keys
    signed: Path
    revision: str
    directory: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    opa_binary()  # skips (or fails under CI) before anything is built without OPA
    directory = tmp_path_factory.mktemp("bundle")
    keys = Keys(directory / "k.pem", directory / "k.pub.pem",
                directory / "other.pem", directory / "other.pub.pem")
    write_signing_key(keys.private, keys.public)
    write_signing_key(keys.other_private, keys.other_public)
    signed = build_bundle(keys.private, directory / "signed.tar.gz", revision="r-2026.11.22")
    return Built(keys, signed, "r-2026.11.22", directory)


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:gz") as archive:
        return {m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
                for m in archive if m.isfile()}


def write_bundle(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def rego_name(files: dict[str, bytes]) -> str:
    return next(n for n in files if n.endswith("authz.rego"))


# --- the good bundle -----------------------------------------------------------------------------


def test_the_built_bundle_verifies_and_holds_the_policies(built: Built) -> None:
    bundle = load_bundle(built.signed, built.keys.public)
    assert bundle.revision == built.revision
    assert bundle.roots == ("gateway/authz",)
    directory = load_policy_sources(policies_dir())
    assert bundle.sources == directory  # every policy, no *_test.rego, same paths and text
    assert bundle.version == policy_version(directory)
    names = set(members(built.signed))
    assert not any(n.endswith("_test.rego") or "schemas" in n for n in names), names


def test_the_default_revision_is_the_policy_digest(built: Built) -> None:
    out = build_bundle(built.keys.private, built.directory / "default-revision.tar.gz")
    bundle = load_bundle(out, built.keys.public)
    assert bundle.revision == policy_version(load_policy_sources(policies_dir()))


def test_both_engines_decide_from_the_bundle_with_its_revision(built: Built) -> None:
    bundle = load_bundle(built.signed, built.keys.public)
    engine = RegorusEngine(bundle=bundle, data=DATA)
    decision = engine.decide(READ)
    assert decision.allow
    assert decision.bundle_revision == built.revision == engine.revision
    assert decision.policy_version == bundle.version
    assert decision.decision_id is None
    server = OpaServer(opa_binary(), bundle=built.signed, verification_key=built.keys.public)
    try:
        remote = OpaServerEngine(server.url, bundle=bundle, data=DATA, timeout=5.0)
        theirs = remote.decide(READ)
        # Decision ids never compare; the engine name differs.
        assert dataclasses.replace(theirs, engine="regorus") == decision
        assert theirs.bundle_revision == built.revision
        assert theirs.decision_id  # OPA logs decisions, so each has an id…
        assert remote.decide(READ).decision_id != theirs.decision_id  # …of its own
        remote.close()
    finally:
        server.stop()


def test_reformatted_json_files_still_verify(built: Built) -> None:
    # The signature covers the parsed JSON, not its formatting: the gateway agrees with OPA.
    files = members(built.signed)
    manifest = json.loads(files["/.manifest"])
    files["/.manifest"] = b"\n  " + json.dumps(dict(reversed(manifest.items())), indent=4).encode()
    path = write_bundle(built.directory / "reformatted.tar.gz", files)
    assert load_bundle(path, built.keys.public).revision == built.revision
    server = OpaServer(opa_binary(), bundle=path, verification_key=built.keys.public)
    server.stop()


def test_file_digests_follow_opa() -> None:
    # Go's json.Number keeps 1.50 as written; strings escape as Go does, without HTML escapes.
    same = bundle_file_digest("data.json", b'{"b": 1.50, "a": "<\\u00e9\\n>"}')
    assert same == bundle_file_digest("x/data.json", '{"a":"<é\\n>","b":1.50}'.encode())
    assert same != bundle_file_digest("data.json", b'{"a":"<\\u00e9\\n>","b":1.5}')
    assert bundle_file_digest("p.rego", b"package p\n") != bundle_file_digest(
        "p.rego", b"package  p\n")


# --- refused bundles: by the gateway and by the real OPA ----------------------------------------


def unsigned(built: Built) -> Path:
    stage = built.directory / "stage"
    for source in load_policy_sources(policies_dir()):
        target = stage / source.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.text, "utf-8")
    (stage / ".manifest").write_text(json.dumps({"revision": "r-u", "roots": ["gateway/authz"]}))
    out = built.directory / "unsigned.tar.gz"
    subprocess.run([str(opa_binary()), "build", "--bundle", ".", "--output", str(out)],
                   cwd=stage, check=True, capture_output=True)
    return out


def signed_by_another_key(built: Built) -> Path:
    return build_bundle(built.keys.other_private, built.directory / "other-key.tar.gz")


def tampered_policy(built: Built) -> Path:
    files = members(built.signed)
    name = rego_name(files)
    files[name] = files[name].replace(b'"admin": {', b'"admin": {"query.aggregate", ', 1)
    assert files[name] != members(built.signed)[name]
    return write_bundle(built.directory / "tampered-policy.tar.gz", files)


def tampered_manifest(built: Built) -> Path:
    files = members(built.signed)
    manifest = json.loads(files["/.manifest"])
    manifest["revision"] = "r-forged"
    files["/.manifest"] = json.dumps(manifest).encode()
    return write_bundle(built.directory / "tampered-manifest.tar.gz", files)


def extra_file(built: Built) -> Path:
    files = members(built.signed)
    files["/gateway/authz/backdoor.rego"] = b'package gateway.authz\n\nbackdoor := true\n'
    return write_bundle(built.directory / "extra-file.tar.gz", files)


def missing_file(built: Built) -> Path:
    files = members(built.signed)
    del files[rego_name(files)]
    return write_bundle(built.directory / "missing-file.tar.gz", files)


def two_signatures(built: Built) -> Path:
    files = members(built.signed)
    document = json.loads(files["/.signatures.json"])
    document["signatures"] *= 2
    files["/.signatures.json"] = json.dumps(document).encode()
    return write_bundle(built.directory / "two-signatures.tar.gz", files)


# (how to spoil the bundle, the gateway's reason, OPA's reason: both engines refuse alike)
REFUSED: list[tuple[Callable[[Built], Path], str, str]] = [
    (unsigned, r"it is not signed \(no \.signatures\.json\)",
     r"bundle missing \.signatures\.json file"),
    (signed_by_another_key, "the signature does not verify with the configured key",
     "failed to verify JWT signature"),
    (tampered_policy, r"gateway/authz/authz\.rego does not match its signed digest",
     r"gateway/authz/authz\.rego: digest mismatch"),
    (tampered_manifest, r"\.manifest does not match its signed digest",
     r"\.manifest: digest mismatch"),
    (extra_file, r"file gateway/authz/backdoor\.rego is not covered by the signature",
     r"file gateway/authz/backdoor\.rego not included in bundle signature"),
    (missing_file, r"signed file\(s\) missing from the bundle: gateway/authz/authz\.rego",
     r"specified in bundle signatures but not found in the target bundle"),
    (two_signatures, "it must carry exactly one signature, not 2",
     "multiple JWTs not supported"),
]
IDS = [make.__name__ for make, _, _ in REFUSED]


@pytest.mark.parametrize(("make", "reason", "opa_reason"), REFUSED, ids=IDS)
def test_the_gateway_refuses_the_bundle(built: Built, make: Callable[[Built], Path],
                                        reason: str, opa_reason: str) -> None:
    bundle = make(built)
    with pytest.raises(PolicyEngineError, match=f"^policy bundle {bundle.name} refused: {reason}"):
        load_bundle(bundle, built.keys.public)
    settings = Settings(workdir=built.directory, policy_bundle_path=bundle,
                        policy_bundle_key_path=built.keys.public)
    with pytest.raises(PolicyEngineError, match=reason):
        engine_from_settings(settings)


@pytest.mark.parametrize(("make", "reason", "opa_reason"), REFUSED, ids=IDS)
def test_the_real_opa_refuses_the_bundle(built: Built, make: Callable[[Built], Path],
                                         reason: str, opa_reason: str) -> None:
    with pytest.raises(OpaExited) as refused:
        OpaServer(opa_binary(), bundle=make(built), verification_key=built.keys.public)
    assert refused.value.returncode != 0
    assert re.search(opa_reason, refused.value.log), refused.value.log


def test_a_bundle_without_a_key_is_refused(built: Built) -> None:
    with pytest.raises(PolicyEngineError, match="no verification key is configured"):
        load_bundle(built.signed, None)
    settings = Settings(workdir=built.directory, policy_bundle_path=built.signed)
    with pytest.raises(PolicyEngineError, match="no verification key is configured"):
        engine_from_settings(settings)


def test_a_bundle_and_a_policy_dir_together_are_refused(built: Built) -> None:
    settings = Settings(workdir=built.directory, policy_bundle_path=built.signed,
                        policy_bundle_key_path=built.keys.public, policy_dir=policies_dir())
    with pytest.raises(PolicyEngineError, match="not both"):
        engine_from_settings(settings)


def test_not_a_bundle_is_refused(built: Built) -> None:
    junk = built.directory / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(PolicyEngineError, match="not a gzipped tar archive"):
        load_bundle(junk, built.keys.public)
    with pytest.raises(PolicyEngineError, match="does not exist"):
        load_bundle(built.directory / "absent.tar.gz", built.keys.public)


def test_a_server_running_another_revision_is_refused(built: Built) -> None:
    other = build_bundle(built.keys.private, built.directory / "r-other.tar.gz", revision="r-other")
    server = OpaServer(opa_binary(), bundle=other, verification_key=built.keys.public)
    try:
        mine = load_bundle(built.signed, built.keys.public)
        with pytest.raises(PolicyEngineError, match=r"runs policy bundle revision r-other, "
                                                    r"the gateway verified r-2026\.11\.22"):
            OpaServerEngine(server.url, bundle=mine, timeout=5.0)
        # Without a local copy the gateway cannot vouch for what the server runs.
        with pytest.raises(PolicyEngineError, match="configure the same signed bundle"):
            OpaServerEngine(server.url, timeout=5.0)
    finally:
        server.stop()


@pytest.fixture
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GATEWAY_POLICY_ENGINE", "GATEWAY_OPA_URL", "GATEWAY_POLICY_BUNDLE_PATH"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("_no_env")
def test_settings_choose_the_engine(built: Built) -> None:
    settings = Settings(workdir=built.directory, policy_bundle_path=built.signed,
                        policy_bundle_key_path=built.keys.public)
    engine = engine_from_settings(settings)
    assert isinstance(engine, RegorusEngine)
    assert engine.revision == built.revision
    with pytest.raises(PolicyEngineError, match="needs opa_url"):
        engine_from_settings(Settings(workdir=built.directory, policy_engine="opa"))
    server = OpaServer(opa_binary(), bundle=built.signed, verification_key=built.keys.public)
    try:
        remote = engine_from_settings(Settings(
            workdir=built.directory, policy_engine="opa", opa_url=server.url,
            opa_timeout_s=5.0, policy_bundle_path=built.signed,
            policy_bundle_key_path=built.keys.public))
        assert isinstance(remote, OpaServerEngine)
        assert remote.revision == built.revision
        remote.close()
    finally:
        server.stop()
