package clustertest

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"
)

func rec(w http.ResponseWriter, id string, part, seq int) {
	fmt.Fprintf(w, "id: %s\nevent: formed\ndata: {\"topic\":\"identity.formed\",\"type\":\"formed\",\"ts\":1,\"payload\":{\"run\":\"r1\",\"part\":%d,\"seq\":%d}}\n\n", id, part, seq)
}

// TestViewerBehavesLikeEventSource guards the viewer's browser behaviour
// against a scripted relay: a new connection and a fresh token each time,
// Last-Event-ID = the last id received, the retry: delay, records of other
// runs ignored, a snapshot on a resume counted as a reset, and a non-200
// answer final.
func TestViewerBehavesLikeEventSource(t *testing.T) {
	var mu sync.Mutex
	var lastIDs, tokens []string
	var remotes = map[string]bool{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n := len(tokens)
		lastIDs = append(lastIDs, r.Header.Get("Last-Event-ID"))
		tokens = append(tokens, r.URL.Query().Get("token"))
		remotes[r.RemoteAddr] = true
		mu.Unlock()
		switch n {
		case 0:
			w.Header().Set("Content-Type", "text/event-stream")
			fmt.Fprint(w, ": keepalive\n\nretry: 20\n\nevent: snapshot\ndata: {\"identities\":[]}\n\n")
			rec(w, "a", 0, 0)
			fmt.Fprint(w, "id: b\nevent: formed\ndata: {\"payload\":{\"run\":\"other\",\"part\":0,\"seq\":9}}\n\n")
			rec(w, "c", 1, 1)
		case 1:
			rec(w, "d", 0, 2)
		case 2:
			fmt.Fprint(w, "event: snapshot\ndata: {\"identities\":[]}\n\n")
			rec(w, "e", 1, 3)
		default:
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	n := 0
	v := NewViewer(srv.URL+"/api/v1/identities/events", "r1", func() string { n++; return "tok" + strconv.Itoa(n) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v.Run(ctx)
	if ctx.Err() != nil {
		t.Fatal("the viewer went on after a 503")
	}
	l := v.Log()
	want := []Rec{{0, "identity.formed/0"}, {1, "identity.formed/1"}, {2, "identity.formed/0"}, {3, "identity.formed/1"}}
	if fmt.Sprint(l.Recs) != fmt.Sprint(want) {
		t.Fatalf("records %v, want %v", l.Recs, want)
	}
	if fmt.Sprint(lastIDs) != fmt.Sprint([]string{"", "c", "d", "e"}) {
		t.Fatalf("Last-Event-ID sent %q", lastIDs)
	}
	if fmt.Sprint(tokens) != fmt.Sprint([]string{"tok1", "tok2", "tok3", "tok4"}) || len(remotes) != 4 {
		t.Fatalf("tokens %q over %d connections", tokens, len(remotes))
	}
	if len(l.Reconnects) != 3 || l.SnapshotResets != 1 || fmt.Sprint(l.Non200) != "[503]" || len(v.Errors()) != 0 {
		t.Fatalf("log %+v, errors %v", l, v.Errors())
	}
	select {
	case <-v.Connected:
	default:
		t.Fatal("Connected not closed after the snapshot")
	}
	// It waited at least the retry: hint (20 ms) between connections.
	for i := 1; i < len(l.Reconnects); i++ {
		if d := l.Reconnects[i].Sub(l.Reconnects[i-1]); d < 20*time.Millisecond {
			t.Fatalf("reconnect %d after %v", i, d)
		}
	}
}
