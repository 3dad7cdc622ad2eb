#!/usr/bin/env bash
# Builds the real Open Policy Agent from its Go module with this machine's Go toolchain
# (nothing downloads a prebuilt binary), into a per-version cache directory, and prints the
# binary's path on stdout. A binary already there is reused.
#
#   tools/build-opa.sh           build if needed, print the path
#   tools/build-opa.sh --path    print where the binary belongs, build nothing
#
# OPA_CACHE_DIR overrides the cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/yibao-gateway).
set -euo pipefail

# The one place the OPA version is pinned (the parity test asks this script for the path).
OPA_VERSION=v1.22.2
OPA_MODULE=github.com/open-policy-agent/opa

die() {
	echo "build-opa: error: $*" >&2
	exit 1
}

cache_root=${OPA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/yibao-gateway}
dest_dir="$cache_root/opa-$OPA_VERSION"
binary="$dest_dir/opa"

case "${1:-}" in
--path)
	echo "$binary"
	exit 0
	;;
"") ;;
*) die "unknown argument: $1 (use --path or nothing)" ;;
esac

# True if the binary runs and is the pinned version. Its output is captured before grep
# reads it: `opa version | grep -q` under pipefail fails whenever grep exits first and opa
# dies of SIGPIPE (seen on a loaded machine, where it triggered needless rebuilds).
is_pinned() {
	local out
	out=$("$1" version 2>/dev/null) || return 1
	grep -qx "Version: ${OPA_VERSION#v}" <<<"$out"
}

# Reuse a cached binary only if it runs and is the pinned version.
if [[ -x "$binary" ]] && is_pinned "$binary"; then
	echo "$binary"
	exit 0
fi

command -v go >/dev/null 2>&1 || die "no Go toolchain on PATH (OPA is built from source; install Go >= 1.26)"

mkdir -p "$dest_dir" || die "cannot create $dest_dir"
staging=$(mktemp -d "$dest_dir/.build.XXXXXX") || die "cannot create a staging directory in $dest_dir"
trap 'rm -rf "$staging"' EXIT

echo "build-opa: building $OPA_MODULE@$OPA_VERSION with $(go version) (a few minutes on 2 cores)" >&2
start=$(date +%s)
# GOTOOLCHAIN=local: never fetch another toolchain; fail instead if this one is too old.
# The module has no replace directives, so `go install module@version` builds it as released.
if ! GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOBIN="$staging" CGO_ENABLED=0 \
	go install -trimpath -ldflags="-s -w" "$OPA_MODULE@$OPA_VERSION" >&2; then
	die "go install $OPA_MODULE@$OPA_VERSION failed (see above)"
fi
[[ -x "$staging/opa" ]] || die "go install finished but produced no opa binary in $staging"
is_pinned "$staging/opa" ||
	die "the built binary does not report version ${OPA_VERSION#v}: $("$staging/opa" version 2>&1 | head -1)"
# Atomic: a concurrent run either sees no binary or a whole one.
mv -f "$staging/opa" "$binary" || die "cannot move the binary to $binary"
echo "build-opa: built $binary in $(($(date +%s) - start)) s" >&2
echo "$binary"
