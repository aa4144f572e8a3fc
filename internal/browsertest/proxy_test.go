package browsertest

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"testing"

	"github.com/decnet/identity-relay/internal/demo"
	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/pkg/api"
)

// plainPage opens one EventSource on the stream, with the page's own query
// (?token=...), and does nothing else: what the browser does is all there is.
const plainPage = `<!doctype html>
<meta charset="utf-8"><title>plain EventSource</title><link rel="icon" href="data:,">
<script>new EventSource("` + api.EventsPath + `" + location.search);</script>
`

// proxy stands in for a Kubernetes Service (and the dashboard's origin) in
// front of relay replicas: it sends each stream request to the next replica
// in its rotation, streaming both ways without buffering, and ends the
// browser's connection abruptly when the replica's breaks. It serves the
// pages under test (/ the plain page, /demo the demo page) so that their
// EventSource is same-origin, as the dashboard's is.
type proxy struct {
	URL string
	t   *testing.T
	srv *httptest.Server
	tr  *http.Transport

	mu       sync.Mutex
	rotation []*relaytest.Process
	next     int
	streams  []streamRequest
	held     bool
	gate     sync.RWMutex // write-locked while held: upstream bodies are not read
}

// streamRequest is one stream request the proxy passed on, and its answer.
type streamRequest struct {
	Replica     *relaytest.Process
	Token       string
	LastEventID *string // the header, nil when absent
	QueryID     *string // ?last_event_id=, nil when absent
	Status      int
}

func newProxy(t *testing.T) *proxy {
	t.Helper()
	p := &proxy{t: t, tr: &http.Transport{DisableKeepAlives: true}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = io.WriteString(w, plainPage)
	})
	mux.HandleFunc("GET /demo", demo.Page)
	mux.HandleFunc("GET "+api.EventsPath, p.stream)
	p.srv = httptest.NewServer(mux)
	p.URL = p.srv.URL
	t.Cleanup(func() {
		p.release()
		p.srv.CloseClientConnections()
		p.srv.Close()
		p.tr.CloseIdleConnections()
	})
	return p
}

// route sets the replicas that get new streams (an endpoint list).
func (p *proxy) route(replicas ...*relaytest.Process) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rotation, p.next = replicas, 0
}

// hold stops reading from the replicas: a viewer whose connection is held
// back. release reads again.
func (p *proxy) hold() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.held {
		p.held = true
		p.gate.Lock()
	}
}

func (p *proxy) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held {
		p.held = false
		p.gate.Unlock()
	}
}

// requests returns the stream requests so far.
func (p *proxy) requests() []streamRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]streamRequest(nil), p.streams...)
}

func (p *proxy) stream(w http.ResponseWriter, r *http.Request) {
	req := streamRequest{Token: r.URL.Query().Get("token")}
	if v, ok := r.Header["Last-Event-Id"]; ok {
		req.LastEventID = &v[0]
	}
	if q := r.URL.Query(); q.Has("last_event_id") {
		v := q.Get("last_event_id")
		req.QueryID = &v
	}
	p.mu.Lock()
	if len(p.rotation) == 0 {
		p.mu.Unlock()
		http.Error(w, "no replica", http.StatusServiceUnavailable)
		return
	}
	req.Replica = p.rotation[p.next%len(p.rotation)]
	p.next++
	i := len(p.streams)
	p.streams = append(p.streams, req)
	p.mu.Unlock()

	target, err := url.Parse(req.Replica.URL)
	if err != nil {
		panic(err)
	}
	setStatus := func(code int) {
		p.mu.Lock()
		p.streams[i].Status = code
		p.mu.Unlock()
	}
	rp := &httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:     p.tr,
		FlushInterval: -1,
		// A broken upstream is expected here (SIGKILL); ReverseProxy then
		// aborts the browser's connection, as a Service would.
		ErrorLog: log.New(io.Discard, "", 0),
		ModifyResponse: func(resp *http.Response) error {
			setStatus(resp.StatusCode)
			resp.Body = heldBody{resp.Body, p}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			setStatus(http.StatusBadGateway)
			http.Error(w, fmt.Sprint(err), http.StatusBadGateway)
		},
	}
	rp.ServeHTTP(w, r)
}

// heldBody is a replica's response body that is not read while the proxy holds.
type heldBody struct {
	io.ReadCloser
	p *proxy
}

func (b heldBody) Read(buf []byte) (int, error) {
	b.p.gate.RLock()
	b.p.gate.RUnlock() //nolint:staticcheck // an empty critical section: wait while held
	return b.ReadCloser.Read(buf)
}
