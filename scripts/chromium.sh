#!/usr/bin/env bash
# Chromium for the browser tests (cmd/relay/browser_test.go drives it over
# the DevTools protocol): Debian's own package, no browser download.
#
#   scripts/chromium.sh install   apt-get install chromium if absent, print its path
#   scripts/chromium.sh env       print the export line for the Go tests
#
# Settings (environment):
#   RELAY_TEST_CHROMIUM   the browser to use (default: chromium on PATH)
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }
die() { echo "chromium.sh: $*" >&2; exit 1; }

find_chromium() {
	if [ -n "${RELAY_TEST_CHROMIUM:-}" ]; then
		[ -x "$RELAY_TEST_CHROMIUM" ] || die "RELAY_TEST_CHROMIUM=$RELAY_TEST_CHROMIUM is not an executable"
		echo "$RELAY_TEST_CHROMIUM"
		return 0
	fi
	command -v chromium
}

install() {
	local bin
	if bin="$(find_chromium)"; then
		echo "$bin"
		return 0
	fi
	[ "$(id -u)" = 0 ] || die "chromium not found and not root to apt-get install it"
	log "chromium not found; installing with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	local try
	for try in 1 2; do
		# The lock timeout: another apt-get on the machine (scripts/pg.sh's)
		# is waited for instead of failing this one.
		{ apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends chromium; } >&2 && break
		[ "$try" = 2 ] && die "apt-get install chromium failed"
		log "apt-get failed; retrying in 5s"
		sleep 5
	done
	bin="$(find_chromium)" || die "chromium installed but not on PATH"
	log "installed $("$bin" --version 2>/dev/null || echo "$bin")"
	echo "$bin"
}

case "${1:-}" in
install) install ;;
env)
	bin="$(find_chromium)" || die "chromium not installed: run $0 install"
	echo "export RELAY_TEST_CHROMIUM=$bin"
	;;
*)
	echo "usage: $0 install|env" >&2
	exit 2
	;;
esac
