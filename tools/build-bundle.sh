#!/usr/bin/env bash
# Builds the signed OPA policy bundle of the gateway with the real `opa build` (the binary
# tools/build-opa.sh builds from its Go module) and prints its path on stdout.
#
#   tools/build-bundle.sh --key KEY.pem [--out FILE] [--revision REV] [--policies DIR]
#
#   --key       P-256 private key (PKCS#8 PEM) that signs the bundle (ES256). Make one with
#               `gateway policy keygen`; it is never committed (*.pem is git-ignored).
#   --out       the bundle (default build/policy-bundle.tar.gz)
#   --revision  the manifest revision recorded in every audit entry (default: the content
#               hash of the policies, sha256:<16 hex>, as the gateway computes it)
#   --policies  the policy directory (default policies/)
#
# The bundle holds every *.rego except *_test.rego (tests and JSON schemas stay out), and a
# .manifest with the revision and roots ["gateway/authz"]: the policies own that path, while
# data.gateway.catalog, .grants and .grant_index stay writable for the gateway's data pushes.
# OPA loads it with
#   opa run --server --bundle FILE --verification-key PUBLIC.pem --signing-alg ES256
# and the gateway verifies it itself (settings.policy_bundle_path, policy_bundle_key_path).
set -euo pipefail

die() {
	echo "build-bundle: error: $*" >&2
	exit 1
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
key=""
out="$repo/build/policy-bundle.tar.gz"
revision=""
policies="$repo/policies"
while [[ $# -gt 0 ]]; do
	case "$1" in
	--key) key=${2:?--key needs a file}; shift 2 ;;
	--out) out=${2:?--out needs a file}; shift 2 ;;
	--revision) revision=${2:?--revision needs a value}; shift 2 ;;
	--policies) policies=${2:?--policies needs a directory}; shift 2 ;;
	*) die "unknown argument: $1" ;;
	esac
done
[[ -n "$key" ]] || die "--key is required (make one with: gateway policy keygen)"
[[ -r "$key" ]] || die "cannot read the signing key $key"
[[ -d "$policies" ]] || die "no policy directory $policies"
key=$(cd "$(dirname "$key")" && pwd)/$(basename "$key")
mkdir -p "$(dirname "$out")" || die "cannot create $(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")

opa=$(bash "$repo/tools/build-opa.sh") || die "no OPA binary (tools/build-opa.sh failed)"
python=${PYTHON:-$repo/.venv/bin/python}

if [[ -z "$revision" ]]; then
	revision=$("$python" -c 'import sys
from pathlib import Path
from gateway.policy._sources import load_policy_sources, policy_version
print(policy_version(load_policy_sources(Path(sys.argv[1]))))' "$policies") ||
		die "cannot compute the policy revision"
fi

stage=$(mktemp -d) || die "cannot create a staging directory"
trap 'rm -rf "$stage"' EXIT
# Only the policies, at their paths relative to the policy directory.
(cd "$policies" && find . -name '*.rego' ! -name '*_test.rego' -type f -print0 |
	xargs -0 -I{} cp --parents {} "$stage/") || die "cannot copy the policies"
"$python" -c 'import json, sys
json.dump({"revision": sys.argv[1], "roots": ["gateway/authz"]}, open(sys.argv[2], "w"))' \
	"$revision" "$stage/.manifest" || die "cannot write the manifest"

# Run inside the staging directory so the files sit at the bundle root (gateway/authz/...).
(cd "$stage" && "$opa" build --bundle . --signing-key "$key" --signing-alg ES256 \
	--output "$out" >&2) || die "opa build failed"
echo "build-bundle: $out (revision $revision)" >&2
echo "$out"
