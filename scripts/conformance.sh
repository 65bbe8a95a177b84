#!/usr/bin/env bash
# The official MCP conformance suite (@modelcontextprotocol/conformance, npm) against
# `apm-broker --http`: provides Node 22 and the suite under .cache/conformance/ (npm registry
# only), starts a broker on a temporary APM_HOME, and runs the server scenarios through a local
# proxy that adds the Bearer header. Details in scripts/conformance.py; results in
# docs/conformance.md.
# Exit: 0 the applicable scenarios pass, 1 one fails, 2 setup error, 77 skipped (no registry/Node).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/conformance.py "$@"
