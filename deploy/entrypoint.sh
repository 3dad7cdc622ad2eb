#!/bin/sh
# Entrypoint of the gateway image.
#
#   (no arguments) or `serve [OPTIONS]`   gateway serve on 0.0.0.0:$PORT with $WORKERS
#                                         worker processes, work directory $GATEWAY_WORKDIR,
#                                         public URL $GATEWAY_BASE_URL (the token audience)
#   anything else                         a `gateway` subcommand, e.g.
#                                         `grant create /in/grant.json --workdir /srv/gateway`
#
# The serve flags are passed explicitly because `gateway serve` gives its own --workdir and
# --base-url to Settings, which take precedence over the GATEWAY_* environment.
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    if [ "$#" -gt 0 ]; then
        shift
    fi
    : "${GATEWAY_BASE_URL:?set GATEWAY_BASE_URL to the public https:// URL of the gateway}"
    exec gateway serve \
        --workdir "${GATEWAY_WORKDIR:-/srv/gateway}" \
        --host 0.0.0.0 \
        --port "${PORT:-8000}" \
        --workers "${WORKERS:-4}" \
        --base-url "$GATEWAY_BASE_URL" \
        "$@"
fi
exec gateway "$@"
