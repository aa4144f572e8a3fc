package browsertest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
	"github.com/decnet/identity-relay/internal/testsync"
)

// Generous deadlines: a condition is waited for, never a fixed time, and
// the machine may be slow (-race, two cores shared with Kafka).
const (
	waitLong  = 45 * time.Second
	pollEvery = 50 * time.Millisecond
)

// newBrowser starts a headless Chromium for t, stopped at cleanup, and
// returns the context of its first tab.
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	out := &testsync.Buffer{}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], // headless, disable-background-networking, ...
		chromedp.ExecPath(testenv.Chromium(t)),
		chromedp.NoSandbox, // as root, Chromium refuses to start with its sandbox
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		// Its singleton socket's directory goes to $TMPDIR, and a killed
		// Chromium leaves it behind: in t's own, removed at cleanup.
		chromedp.Env("TMPDIR="+t.TempDir()),
		chromedp.CombinedOutput(out),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancel()
		cancelAlloc()
		if t.Failed() {
			t.Logf("chromium output (without its D-Bus complaints):\n%s", withoutDBus(out.String()))
		}
	})
	start := time.Now()
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v\n%s", err, out.String())
	}
	t.Logf("chromium started in %v", time.Since(start).Round(time.Millisecond))
	return ctx
}

// withoutDBus drops the lines of Chromium's output about the D-Bus it
// does not find (dozens a start, none of them the test's business).
func withoutDBus(out string) string {
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		if !strings.Contains(l, ":ERROR:dbus/") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// pageEvent is one thing an EventSource of the page did, as the recorder
// (recorderJS) saw it: an event of a type it listens to, with its id and
// data, or an open or an error.
type pageEvent struct {
	Src  int     `json:"src"` // which EventSource of the page, in the order they were made
	Type string  `json:"type"`
	ID   string  `json:"id"`
	Data *string `json:"data"` // nil for open and for EventSource's own error events
}

// stateClosed is EventSource's readyState once it has given up for good.
const stateClosed = 2

// recorderJS runs in the page before its own scripts: it wraps the
// EventSource constructor so that what every EventSource the page makes
// receives, across the browser's own reconnects, is recorded in order, with
// the ids as the browser parsed them (lastEventId). %s is the JSON array of
// the event types to record.
const recorderJS = `(function (types) {
  var Native = window.EventSource, rec = window.__recorded = [];
  window.__sources = [];
  function Recorded(url, init) {
    var es = new Native(url, init), src = window.__sources.length;
    window.__sources.push(es);
    function add(type, e) {
      rec.push({src: src, type: type, id: e.lastEventId || "", data: e.data});
    }
    es.addEventListener("open", function (e) { add("open", e); });
    types.forEach(function (type) { es.addEventListener(type, function (e) { add(type, e); }); });
    return es;
  }
  Recorded.prototype = Native.prototype;
  Recorded.CONNECTING = 0; Recorded.OPEN = 1; Recorded.CLOSED = 2;
  window.EventSource = Recorded;
})(%s);`

// tab is one browser tab with the recorder installed; it also keeps what
// a person would notice as broken: console errors, uncaught exceptions,
// failed requests and answers of 400 and above.
type tab struct {
	t   *testing.T
	ctx context.Context

	mu       sync.Mutex
	problems []string
	urls     map[network.RequestID]string
	events   []pageEvent // everything recorded so far, drained from the page by poll
}

// openTab opens url in a new tab of the browser bctx, recording the
// EventSource event types types. It returns once the page has loaded.
func openTab(t *testing.T, bctx context.Context, url string, types ...string) *tab {
	t.Helper()
	tb := &tab{t: t, urls: map[network.RequestID]string{}}
	ctx, cancel := chromedp.NewContext(bctx, chromedp.WithListener(tb.listen))
	t.Cleanup(cancel)
	tb.ctx = ctx
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("open tab: %v", err)
	}
	typesJSON, _ := json.Marshal(append([]string{"error"}, types...))
	if _, err := chromedp.Call(tb.ctx, page.AddScriptToEvaluateOnNewDocument,
		page.AddScriptToEvaluateOnNewDocumentParams{Source: fmt.Sprintf(recorderJS, typesJSON)}); err != nil {
		t.Fatalf("install the recorder: %v", err)
	}
	if err := chromedp.Do(tb.ctx, chromedp.Navigate(url)); err != nil {
		t.Fatalf("navigate to %s: %v", redact(url), err)
	}
	return tb
}

// listen runs in the tab's message loop: it only records.
func (tb *tab) listen(ev any) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	switch ev := ev.(type) {
	case *runtime.EventConsoleAPICalled:
		if ev.Type == runtime.ConsoleAPICalledTypeError {
			var args []string
			for _, a := range ev.Args {
				if a.Value != nil {
					args = append(args, string(a.Value))
				} else {
					args = append(args, a.Description)
				}
			}
			tb.problems = append(tb.problems, "console.error: "+strings.Join(args, " "))
		}
	case *runtime.EventExceptionThrown:
		text := ev.ExceptionDetails.Text
		if ev.ExceptionDetails.Exception != nil {
			text += " " + ev.ExceptionDetails.Exception.Description
		}
		tb.problems = append(tb.problems, "uncaught exception: "+text)
	case *log.EventEntryAdded:
		if ev.Entry.Level == log.EntryLevelError {
			tb.problems = append(tb.problems, fmt.Sprintf("console (%s): %s %s", ev.Entry.Source, ev.Entry.Text, redact(ev.Entry.URL)))
		}
	case *network.EventRequestWillBeSent:
		tb.urls[ev.RequestID] = ev.Request.URL
	case *network.EventResponseReceived:
		if ev.Response.Status >= 400 {
			tb.problems = append(tb.problems, fmt.Sprintf("%d for %s", ev.Response.Status, redact(ev.Response.URL)))
		}
	case *network.EventLoadingFailed:
		tb.problems = append(tb.problems, fmt.Sprintf("%s (%s, canceled %v): %s", requestFailed, ev.ErrorText, ev.Canceled, redact(tb.urls[ev.RequestID])))
	}
}

// requestFailed starts the problem of a request that got no whole answer.
const requestFailed = "request failed"

// redact cuts the query (tokens) off a URL for the test's log.
func redact(url string) string {
	if i := strings.IndexByte(url, '?'); i >= 0 {
		return url[:i] + "?…"
	}
	return url
}

// Problems returns what went wrong in the tab so far.
func (tb *tab) Problems() []string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return append([]string(nil), tb.problems...)
}

// eval runs a JavaScript expression in the page and decodes its value.
func eval[T any](tb *tab, expr string) T {
	tb.t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, 20*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		tb.t.Fatalf("evaluate %q: %v", expr, err)
	}
	return v
}

// poll drains what the recorder holds and returns what is new.
func (tb *tab) poll() []pageEvent {
	tb.t.Helper()
	fresh := eval[[]pageEvent](tb, `window.__recorded.splice(0)`)
	tb.mu.Lock()
	tb.events = append(tb.events, fresh...)
	tb.mu.Unlock()
	return fresh
}

// sourceState returns the readyState of the page's EventSource number src.
func (tb *tab) sourceState(src int) int {
	tb.t.Helper()
	return eval[int](tb, fmt.Sprintf(`window.__sources[%d].readyState`, src))
}

// waitFor polls the page until cond holds, failing after timeout.
func (tb *tab) waitFor(what string, timeout time.Duration, cond func() bool) {
	tb.t.Helper()
	until(tb.t, timeout, func() bool { tb.poll(); return cond() }, func() string {
		return fmt.Sprintf("%s; the page recorded %s", what, tb.summary())
	})
}

// until polls cond until it holds, failing after timeout with what it
// waited for, and what the page reported: a condition is waited for with
// a generous deadline, never a fixed sleep.
func until(t *testing.T, timeout time.Duration, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", timeout, what())
		}
		time.Sleep(pollEvery)
	}
}

// summary describes what was recorded, for failure messages.
func (tb *tab) summary() string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	counts := map[string]int{}
	for _, e := range tb.events {
		counts[fmt.Sprintf("%s@%d", e.Type, e.Src)]++
	}
	return fmt.Sprint(counts)
}

// screenshot saves a full-page PNG as a test artifact and logs its path.
func (tb *tab) screenshot(name string) {
	tb.t.Helper()
	buf, err := chromedp.Run(tb.ctx, chromedp.FullScreenshot(100)) // quality 100: PNG
	if err != nil {
		tb.t.Fatalf("screenshot: %v", err)
	}
	dir := os.Getenv("RELAY_TEST_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "relay-test-artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, buf, 0o644); err != nil {
		tb.t.Fatal(err)
	}
	tb.t.Logf("screenshot: %s (%d bytes)", path, len(buf))
}

// viewer follows what one tab's page received: every event of the test's
// type goes through relaytest's exactly-once Collector.
type viewer struct {
	tab        *tab
	c          *relaytest.Collector
	event      string // the SSE event name of the test's topic
	snapshots  int
	snapshotID string // the id of the last snapshot
	opens      int
	// lastIDs[k] is the id of the last event received before the k+1-th
	// open (the Last-Event-ID that reconnect should carry).
	lastIDs []string
}

func newViewer(tb *tab, event string) *viewer {
	return &viewer{tab: tb, c: relaytest.NewCollector(tb.t), event: event}
}

// update takes in what the page recorded since the last call.
func (v *viewer) update() {
	v.tab.t.Helper()
	for _, e := range v.tab.poll() {
		switch {
		case e.Type == "open":
			v.opens++
			v.lastIDs = append(v.lastIDs, v.c.LastID)
		case e.Type == "snapshot":
			v.snapshots++
			v.snapshotID = e.ID
		case e.Type == "error" && e.Data != nil:
			v.tab.t.Fatalf("the relay sent an error frame: %s", *e.Data)
		case e.Type == v.event:
			if e.Data == nil {
				v.tab.t.Fatalf("%s event without data", e.Type)
			}
			v.c.Add(e.ID, *e.Data)
		}
	}
}

// waitAll updates v until it holds seqs [0, n), failing after timeout with
// the seqs it lacks.
func (v *viewer) waitAll(n int, timeout time.Duration) {
	v.tab.t.Helper()
	until(v.tab.t, timeout, func() bool { v.update(); return len(v.c.Seen) >= n }, func() string {
		var missing []int
		for i := range n {
			if !v.c.Seen[i] {
				missing = append(missing, i)
			}
		}
		return fmt.Sprintf("all %d events: %d missing, seqs %v\nproblems: %q", n, len(missing), missing, v.tab.Problems())
	})
	v.c.Complete(n)
}

// waitFor updates v until cond holds, failing after timeout.
func (v *viewer) waitFor(what string, timeout time.Duration, cond func() bool) {
	v.tab.t.Helper()
	until(v.tab.t, timeout, func() bool { v.update(); return cond() }, func() string {
		return fmt.Sprintf("%s: %d events, %d snapshots, %d opens\nproblems: %q",
			what, len(v.c.Seen), v.snapshots, v.opens, v.tab.Problems())
	})
}
