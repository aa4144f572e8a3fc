package api

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// A stream requested over HTTP/2 (where a connection cannot be taken over)
// is refused cleanly with 505 before any check, not a panic, and holds no
// slot or subscription.
func TestHTTP2Refused(t *testing.T) {
	h := newHarness(t, newFakeStore(), nil)
	ts := httptest.NewUnstartedServer(h.srv.Handler())
	ts.EnableHTTP2 = true
	ts.StartTLS()
	defer ts.Close()
	req, err := http.NewRequest(http.MethodGet, ts.URL+EventsPath+"?token="+hs256(t, claimsFor("u-viewer", nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.ProtoMajor != 2 {
		t.Fatalf("the test spoke %s, want HTTP/2", resp.Proto)
	}
	checkRefused(t, resp, http.StatusHTTPVersionNotSupported, `{"detail":"Streams are served over HTTP/1.1"}`)
	if n := h.broker.Stats().Subscribers; n != 0 {
		t.Fatalf("%d subscriptions left", n)
	}
	h.waitOpen(t, "u-viewer", 0)
}
