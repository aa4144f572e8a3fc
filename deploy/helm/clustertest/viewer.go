package clustertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/decnet/identity-relay/internal/ssetest"
)

// Viewer is one browser tab with an EventSource on the relay's stream, as far
// as the relay can tell: each connection is new (through the Service, so it
// may land on any pod), carries a fresh token in ?token= and, after the first,
// Last-Event-ID set to the last id received; after a stream ends or a
// connection fails it waits the retry: delay (plus up to half of it at
// random, as many tabs opened together do not reconnect in step) and
// reconnects; an answer other than 200 is final, as it is for EventSource.
type Viewer struct {
	// URL is the stream's URL, e.g. http://10.97.0.20/api/v1/identities/events.
	URL string
	// Token returns a fresh token for each connection.
	Token func() string
	// Run is the producer's run id: records of other runs are ignored.
	RunID string
	// Idle ends a connection that received nothing, keepalives included, for
	// this long (a browser would wait for TCP to notice; the relay sends a
	// keepalive every 15 s). Zero: 45 s.
	Idle time.Duration

	// Connected is closed when the first stream's snapshot arrived.
	Connected chan struct{}

	mu       sync.Mutex
	log      ViewerLog
	lastID   string
	lastRec  time.Time
	errs     []string
	retry    time.Duration
	finished bool
}

// NewViewer returns a viewer of streamURL for the producer's run.
func NewViewer(streamURL, run string, token func() string) *Viewer {
	return &Viewer{URL: streamURL, RunID: run, Token: token, Connected: make(chan struct{}), retry: 3 * time.Second}
}

// Log returns what the viewer saw so far and, after Run returned, in all.
func (v *Viewer) Log() ViewerLog {
	v.mu.Lock()
	defer v.mu.Unlock()
	l := v.log
	l.Recs = append([]Rec(nil), v.log.Recs...)
	if !v.lastRec.IsZero() && !v.finished {
		l.LongestSilence = max(l.LongestSilence, time.Since(v.lastRec))
	}
	return l
}

// Errors returns the viewer's protocol errors: frames a browser would read
// differently from what the relay meant (ssetest's strict parser).
func (v *Viewer) Errors() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]string(nil), v.errs...)
}

// Count returns how many records of the run the viewer received.
func (v *Viewer) Count() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.log.Recs)
}

// Run streams until ctx ends or an answer other than 200 arrives.
func (v *Viewer) Run(ctx context.Context) {
	idle := v.Idle
	if idle == 0 {
		idle = 45 * time.Second
	}
	// One connection per request, as after a browser's reconnect.
	tr := &http.Transport{DisableKeepAlives: true, DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	defer func() {
		v.mu.Lock()
		if !v.lastRec.IsZero() {
			v.log.LongestSilence = max(v.log.LongestSilence, time.Since(v.lastRec))
		}
		v.finished = true
		v.mu.Unlock()
	}()
	first := true
	for ctx.Err() == nil {
		if !first {
			v.mu.Lock()
			v.log.Reconnects = append(v.log.Reconnects, time.Now())
			v.mu.Unlock()
		}
		first = false
		if final := v.stream(ctx, client, idle); final {
			return
		}
		v.mu.Lock()
		d := v.retry + rand.N(v.retry/2+1)
		v.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
	}
}

// stream makes one request and reads its stream; it reports whether the
// viewer must stop (a non-200 answer).
func (v *Viewer) stream(ctx context.Context, client *http.Client, idle time.Duration) bool {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	u := v.URL + "?token=" + url.QueryEscape(v.Token())
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, u, nil)
	if err != nil {
		panic(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	v.mu.Lock()
	resuming := v.lastID != ""
	if resuming {
		req.Header.Set("Last-Event-ID", v.lastID)
	}
	v.mu.Unlock()
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			v.mu.Lock()
			v.log.ConnectErrors++
			v.mu.Unlock()
		}
		return false
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		v.mu.Lock()
		v.log.Non200 = append(v.log.Non200, resp.StatusCode)
		v.mu.Unlock()
		return true
	}
	// A connection silent for idle is taken as dead.
	timer := time.AfterFunc(idle, cancel)
	defer timer.Stop()
	rd := ssetest.NewReader(resp.Body)
	for {
		f, err := rd.Next()
		if err != nil {
			if ctx.Err() == nil && !endOfConnection(err) {
				v.mu.Lock()
				v.errs = append(v.errs, err.Error())
				v.mu.Unlock()
			}
			return false
		}
		timer.Reset(idle)
		v.frame(f, resuming)
	}
}

// endOfConnection tells a stream cut by the network or the relay (which a
// browser takes as a reason to reconnect) from a frame it cannot read.
func endOfConnection(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, ssetest.ErrUnterminated) ||
		errors.Is(err, context.Canceled) || errors.As(err, &ne) || errors.Is(err, net.ErrClosed)
}

func (v *Viewer) frame(f ssetest.Frame, resuming bool) {
	now := time.Now()
	v.mu.Lock()
	defer v.mu.Unlock()
	if f.HasRetry {
		if ms, err := strconv.Atoi(f.Retry); err == nil && ms > 0 {
			v.retry = time.Duration(ms) * time.Millisecond
		}
	}
	if f.HasID {
		// EventSource keeps the last id it saw, an empty one included.
		v.lastID = f.ID
	}
	switch f.Event {
	case "":
		return
	case "snapshot":
		if resuming {
			v.log.SnapshotResets++
		}
		select {
		case <-v.Connected:
		default:
			close(v.Connected)
		}
		return
	}
	rec, ok := parseRec(f.DataString(), v.RunID)
	if !ok {
		return
	}
	if !v.lastRec.IsZero() {
		v.log.LongestSilence = max(v.log.LongestSilence, now.Sub(v.lastRec))
	}
	v.lastRec = now
	v.log.Recs = append(v.log.Recs, rec)
}

// parseRec reads the run, topic, partition and seq of a frame's data, as the
// relay writes it: {"topic":"...","type":"...","ts":...,"payload":{"run":"...","part":P,"seq":N,...}}.
func parseRec(data, run string) (Rec, bool) {
	d := []byte(data)
	if !bytes.Contains(d, []byte(`"run":"`+run+`"`)) {
		return Rec{}, false
	}
	topic, ok := stringAfter(d, `"topic":"`)
	if !ok {
		return Rec{}, false
	}
	part, ok1 := numberAfter(d, `"part":`)
	seq, ok2 := numberAfter(d, `"seq":`)
	if !ok1 || !ok2 {
		return Rec{}, false
	}
	return Rec{Seq: seq, Part: fmt.Sprintf("%s/%d", topic, part)}, true
}

func stringAfter(d []byte, key string) (string, bool) {
	i := bytes.Index(d, []byte(key))
	if i < 0 {
		return "", false
	}
	rest := d[i+len(key):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return "", false
	}
	return string(rest[:j]), true
}

func numberAfter(d []byte, key string) (int64, bool) {
	i := bytes.Index(d, []byte(key))
	if i < 0 {
		return 0, false
	}
	rest := d[i+len(key):]
	j := 0
	for j < len(rest) && (rest[j] == '-' || rest[j] >= '0' && rest[j] <= '9') {
		j++
	}
	n, err := strconv.ParseInt(string(rest[:j]), 10, 64)
	return n, err == nil
}
