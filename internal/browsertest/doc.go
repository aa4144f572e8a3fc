// Package browsertest holds the tests in which a real browser is the
// client: headless Chromium (Debian's, installed by scripts/chromium.sh),
// driven over the DevTools protocol with chromedp. The relay's users are
// browsers, and what matters most to them is done by the browser, not by
// the relay: EventSource's own reconnect after retry:, its Last-Event-ID,
// and its giving up for good on an answer other than 200. These tests run
// the relay binary on the real PostgreSQL and Kafka (internal/relaytest)
// and check what the page ends up holding with relaytest's exactly-once
// Collector.
//
// Screenshots are kept in $RELAY_TEST_ARTIFACTS (default: relay-test-artifacts
// in the system's temporary directory); the tests log their paths.
package browsertest
