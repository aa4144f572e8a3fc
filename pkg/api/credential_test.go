package api

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// testRecheck is the AuthCacheTTL of these tests: streams re-check their
// credential this often (the relay runs with 10 s).
const testRecheck = 200 * time.Millisecond

// waitCounter waits until c reaches want, then returns its value.
func waitCounter(t *testing.T, what string, c prometheus.Counter, want float64) float64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := counterValue(t, c)
		if got >= want {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", what, got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// readToEnd reads the rest of a stream; the error is nil only for a clean
// end of the chunked response (its last chunk), not for a cut connection.
func readToEnd(t *testing.T, body io.Reader) ([]byte, error) {
	t.Helper()
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(body)
		done <- result{b, err}
	}()
	select {
	case r := <-done:
		return r.b, r.err
	case <-time.After(20 * time.Second): // bounds a hang only
		t.Fatal("the stream did not end")
		return nil, nil
	}
}

// TestStreamEndsWithItsCredential guards CONTRACT.md "After the connection
// is open": an open stream ends cleanly, between frames, when its token
// expires or when a re-check finds it revoked, cut off or no longer allowed;
// it is counted as reason "credential", and the reconnect gets what a new
// connection would.
func TestStreamEndsWithItsCredential(t *testing.T) {
	later := time.Now().Add(time.Hour)
	tests := []struct {
		name   string
		claims jwt.MapClaims    // changes to claimsFor("u-viewer")
		change func(*fakeStore) // what the database does while the stream is open
		code   int
		body   string
	}{
		{name: "token expires", claims: jwt.MapClaims{"exp": time.Now().Add(2 * time.Second).Unix()}, code: 401, body: bodyCredentials},
		{name: "jti revoked", change: func(s *fakeStore) { s.revoked["jti-u-viewer"] = true }, code: 401, body: bodyCredentials},
		{name: "tokens_valid_from moved past iat", change: func(s *fakeStore) { s.users["u-viewer"].TokensValidFrom = &later }, code: 401, body: bodyCredentials},
		{name: "user deleted", change: func(s *fakeStore) { delete(s.users, "u-viewer") }, code: 401, body: bodyCredentials},
		{name: "role no longer allows streaming", change: func(s *fakeStore) { s.users["u-viewer"].Role = "auditor" }, code: 403, body: bodyPermissions},
		{name: "must_change_password set", change: func(s *fakeStore) { s.users["u-viewer"].MustChangePassword = true }, code: 403, body: bodyPassword},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := newFakeStore()
			h := newHarness(t, store, func(c *Config) {
				c.AuthCacheTTL = testRecheck
				// The stream is idle past its last write's deadline when it ends.
				c.WriteTimeout = testRecheck / 4
			})
			tok := hs256(t, claimsFor("u-viewer", tt.claims))
			resp := h.get(t, "", tok)
			checkStream(t, resp)
			if tt.change != nil {
				store.update(tt.change)
			}
			rest, err := readToEnd(t, resp.Body)
			if err != nil {
				t.Fatalf("stream cut instead of ended: %v (read %q)", err, rest)
			}
			if _, err := ssetest.ParseFrames(rest); err != nil {
				t.Fatalf("the stream did not end between frames: %v (%q)", err, rest)
			}
			if got := waitCounter(t, "credential disconnects", h.srv.m.disconnects.WithLabelValues(string(reasonCredential)), 1); got != 1 {
				t.Errorf("%v disconnects for the credential, want 1", got)
			}
			checkRefused(t, h.get(t, "", tok), tt.code, tt.body)
		})
	}
}

// TestShutdownEndsIdleStreamCleanly guards the end of a stream that was idle
// longer than WriteTimeout: the deadline of its last write has passed, and
// the last chunk must still go out (a browser would otherwise see an error).
func TestShutdownEndsIdleStreamCleanly(t *testing.T) {
	h := newHarness(t, newFakeStore(), func(c *Config) { c.WriteTimeout = 50 * time.Millisecond })
	resp := h.get(t, "", hs256(t, claimsFor("u-viewer", nil)))
	checkStream(t, resp)
	time.Sleep(200 * time.Millisecond) // past the deadline of the last write
	if err := h.broker.Close(); err != nil {
		t.Fatal(err)
	}
	if rest, err := readToEnd(t, resp.Body); err != nil {
		t.Fatalf("stream cut instead of ended: %v (read %q)", err, rest)
	}
	if got := waitCounter(t, "shutdown disconnects", h.srv.m.disconnects.WithLabelValues(string(fanout.ReasonShutdown)), 1); got != 1 {
		t.Errorf("%v disconnects for shutdown, want 1", got)
	}
}

// TestStreamOutlivesDatabaseOutage guards the other side: a re-check that
// fails because the database errs or does not answer within DBTimeout keeps
// the stream (counted in relay_credential_rechecks_failed_total), frames go
// on meanwhile, and once the database answers a revocation still ends it.
func TestStreamOutlivesDatabaseOutage(t *testing.T) {
	dbDown := errors.New("dial tcp 127.0.0.1:5432: connect: connection refused")
	tests := []struct {
		name   string
		outage func(*fakeStore)
	}{
		{"lookups fail", func(s *fakeStore) { s.errs = map[string]error{"User": dbDown, "Revoked": dbDown} }},
		{"lookups hang", func(s *fakeStore) { s.blocks = map[string]bool{"User": true, "Revoked": true} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := newFakeStore()
			h := newHarness(t, store, func(c *Config) {
				c.AuthCacheTTL = testRecheck
				c.DBTimeout = 300 * time.Millisecond
			})
			resp := h.get(t, "", hs256(t, claimsFor("u-viewer", nil)))
			checkStream(t, resp)
			br := bufio.NewReader(resp.Body)

			store.update(tt.outage)
			waitCounter(t, "relay_credential_rechecks_failed_total", h.srv.m.rechecksFailed, 2)
			publishSeq(t, h.broker, 1)
			expectSeq(t, br, 1)

			store.update(func(s *fakeStore) { s.errs, s.blocks = nil, nil })
			publishSeq(t, h.broker, 2)
			expectSeq(t, br, 2)
			if got := h.disconnects(t, reasonCredential); got != 0 {
				t.Fatalf("%v streams ended for the credential during the outage, want 0", got)
			}
			store.update(func(s *fakeStore) { s.revoked["jti-u-viewer"] = true })
			if _, err := readToEnd(t, br); err != nil {
				t.Fatalf("stream cut instead of ended after the revocation: %v", err)
			}
			waitCounter(t, "credential disconnects", h.srv.m.disconnects.WithLabelValues(string(reasonCredential)), 1)
		})
	}
}

// TestRecheckWaitsNotForTheDatabase guards the write path: while a re-check
// waits for a database that does not answer, frames still reach the viewer.
func TestRecheckWaitsNotForTheDatabase(t *testing.T) {
	store := newFakeStore()
	store.gate = make(chan struct{})
	h := newHarness(t, store, func(c *Config) {
		c.AuthCacheTTL = testRecheck
		c.DBTimeout = time.Minute // longer than the test waits for the frame
	})
	t.Cleanup(func() { close(store.gate) }) // the database answers at the end
	resp := h.get(t, "", hs256(t, claimsFor("u-viewer", nil)))
	checkStream(t, resp)
	store.update(func(s *fakeStore) { s.blocks = map[string]bool{"User": true} })
	waitCalls(t, "User lookups", &store.userCalls, 2) // the connect's, then the re-check's, now waiting
	publishSeq(t, h.broker, 1)
	expectSeq(t, bufio.NewReader(resp.Body), 1)
}

// TestRecheckSharesLookups guards the cost of re-checks: streams of one
// user share each lookup through the cache, so however many there are, the
// user row is read at most once per AuthCacheTTL.
func TestRecheckSharesLookups(t *testing.T) {
	store := newFakeStore()
	h := newHarness(t, store, func(c *Config) { c.AuthCacheTTL = testRecheck })
	tok := hs256(t, claimsFor("u-viewer", nil))
	start := time.Now()
	for range h.srv.cfg.MaxPerUser {
		checkStream(t, h.get(t, "", tok))
	}
	time.Sleep(10 * testRecheck)
	// A lookup is cached for the TTL once it returns, so lookups of one key
	// start at least a TTL apart, whatever the scheduling.
	most := 1 + int64(time.Since(start)/testRecheck)
	if got := store.userCalls.Load(); got > most || got < 2 {
		t.Errorf("%d User lookups for %d streams in %v, want 2 to %d (one per TTL, shared)", got, h.srv.cfg.MaxPerUser, time.Since(start), most)
	}
}

// publishSeq publishes {"seq":n}.
func publishSeq(t *testing.T, b *fanout.Broadcaster, n int) {
	t.Helper()
	ev := sse.Event{Topic: "identity.formed", Type: "formed", TS: "1", Payload: json.RawMessage(fmt.Sprintf(`{"seq":%d}`, n))}
	if err := b.Publish(ev); err != nil {
		t.Fatal(err)
	}
}

// expectSeq reads the next frame and checks it is {"seq":n}.
func expectSeq(t *testing.T, br *bufio.Reader, n int) {
	t.Helper()
	if f, want := readFrame(t, br), fmt.Sprintf(`"payload":{"seq":%d}`, n); !strings.Contains(string(f.Raw), want) {
		t.Fatalf("frame %q, want one with %s", f.Raw, want)
	}
}
