package browsertest

import (
	"regexp"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/demo"
	"github.com/decnet/identity-relay/internal/relaytest"
)

// The demo page as a person sees it: relay --demo's printed URL, opened in
// headless Chromium, shows the snapshot table and live events of at least
// two kinds, with no console error and no failed request.
func TestDemoPageInChromium(t *testing.T) {
	bctx := newBrowser(t)
	relay := relaytest.Start(t, map[string]string{"RELAY_LISTEN_ADDR": "127.0.0.1:0"}, "--demo")
	re := regexp.MustCompile(`Open the live page: (http://\S+)`)
	var m []string
	for deadline := time.Now().Add(10 * time.Second); m == nil && time.Now().Before(deadline); {
		time.Sleep(pollEvery)
		m = re.FindStringSubmatch(relay.Logs())
	}
	if m == nil {
		t.Fatalf("demo printed no page URL:\n%s", relay.Logs())
	}
	names := make([]string, len(demo.Topics))
	for i, topic := range demo.Topics {
		names[i] = topic[len("identity."):]
	}
	tb := openTab(t, bctx, m[1], append([]string{"snapshot"}, names...)...)

	// What the page shows, read from its DOM.
	type shown struct {
		Status string `json:"status"`
		Rows   int    `json:"rows"`
		Kinds  int    `json:"kinds"`
		Count  string `json:"count"`
	}
	var got shown
	tb.waitFor("the snapshot table and live events of two kinds", waitLong, func() bool {
		got = eval[shown](tb, `({
			status: document.getElementById("status").textContent,
			rows: document.querySelectorAll("#identities tr").length,
			kinds: new Set(Array.from(document.querySelectorAll("#events .name"), function (e) { return e.textContent; })).size,
			count: document.getElementById("count").textContent
		})`)
		return got.Status == "open" && got.Rows >= 3 && got.Kinds >= 2
	})
	t.Logf("the page shows %d identities and %s events of %d kinds", got.Rows, got.Count, got.Kinds)
	tb.screenshot("demo-page.png")
	if p := tb.Problems(); len(p) > 0 {
		t.Fatalf("the demo page had problems a person would see in the console:\n%q", p)
	}
}
