package main

// Bad input end to end: malformed Kafka records, a slowloris client and
// viewers that never read, against the real broker and the relay binary.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/internal/testenv"
	"github.com/decnet/identity-relay/pkg/api"
)

// skippedCounts returns relay_records_skipped_total by reason.
func skippedCounts(t *testing.T, baseURL string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, line := range strings.Split(relaytest.Get(t, baseURL+"/metrics"), "\n") {
		rest, ok := strings.CutPrefix(line, `relay_records_skipped_total{reason="`)
		if !ok {
			continue
		}
		reason, value, ok := strings.Cut(rest, `"} `)
		if !ok {
			t.Fatalf("metric line %q", line)
		}
		f, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		out[reason] = f
	}
	return out
}

// createBigTopic creates a one-partition topic that takes records up to 3 MB.
func createBigTopic(t *testing.T, cl *kgo.Client, topic string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	adm := kadm.NewClient(cl)
	resp, err := adm.CreateTopic(ctx, 1, 1, map[string]*string{"max.message.bytes": kadm.StringPtr("3000000")}, topic)
	if err != nil || resp.Err != nil {
		t.Fatalf("create topic %s: %v %v", topic, err, resp.Err)
	}
	for ctx.Err() == nil {
		if md, err := adm.Metadata(ctx, topic); err == nil {
			if d, ok := md.Topics[topic]; ok && d.Err == nil && len(d.Partitions) == 1 {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("topic %s not ready", topic)
}

// produceValue produces value (nil: a tombstone) with a timestamp of now and
// returns that timestamp as the relay renders it: epoch seconds, ms precision.
func produceValue(t *testing.T, cl *kgo.Client, topic string, value []byte) string {
	t.Helper()
	ts := time.UnixMilli(time.Now().UnixMilli())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, &kgo.Record{Topic: topic, Value: value, Timestamp: ts}).FirstErr(); err != nil {
		t.Fatalf("produce %d bytes: %v", len(value), err)
	}
	return strconv.FormatFloat(float64(ts.UnixMilli())/1000, 'f', -1, 64)
}

// TestBadRecordsEndToEnd guards: each malformed record is skipped and counted once by reason, hostile strings arrive escaped, the stream goes on in order.
func TestBadRecordsEndToEnd(t *testing.T) {
	env, seqTopic := relaytest.TopicEnv(t, nil)
	topic := strings.TrimSuffix(seqTopic, ".seq") + ".formed"
	name := strings.TrimPrefix(topic, "identity.")
	brokers := testenv.KafkaBrokers(t)
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ProducerLinger(0),
		kgo.ProducerBatchMaxBytes(4<<20), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	createBigTopic(t, cl, topic)
	r := relaytest.Start(t, env)
	r.WaitReady(t)
	token := relaytest.ViewerToken(t)
	v := openViewer(t, streamClient(t), r.URL, token)
	expectStarted(t, []*sseViewer{v}, 30*time.Second)

	// bare is the data of a record that is itself the payload.
	bare := func(payload string) func(string) string {
		return func(ts string) string {
			return fmt.Sprintf(`{"topic":%q,"type":%q,"ts":%s,"payload":%s}`, topic, name, ts, payload)
		}
	}
	const oneMiB = 1 << 20 // RELAY_MAX_RECORD_BYTES' default
	padded := func(size int) []byte {
		return []byte(`{"pad":"` + strings.Repeat("x", size-len(`{"pad":""}`)) + `"}`)
	}
	// Strings a naive encoder would turn into SSE lines, fields or a CR.
	hostile := `{"a":"\n\ndata: x","b":"\r","c":"\r\n\r\nevent: merged\ndata: {}","d":"\u0000\u0001\u001b\u007f",` +
		`"e":"\u2028\u2029\u0085","f":"<script>&amp;</script>","g":"\"}\n\n"}`
	cases := []struct {
		name  string
		value []byte
		skip  string              // the skip reason; "" when delivered
		want  func(string) string // the data line when delivered, given the record ts
	}{
		{name: "not JSON", value: []byte("not json"), skip: "not_json"},
		{name: "truncated JSON", value: []byte(`{"seq":`), skip: "not_json"},
		{name: "tombstone (null value)", value: nil, skip: "not_json"},
		{name: "empty value", value: []byte{}, skip: "not_json"},
		{name: "raw CR inside a string", value: []byte("{\"s\":\"a\rb\"}"), skip: "not_json"},
		{name: "JSON array", value: []byte(`[1,2]`), skip: "not_object"},
		{name: "JSON string", value: []byte(`"identity"`), skip: "not_object"},
		{name: "JSON null", value: []byte(`null`), skip: "not_object"},
		{name: "JSON number", value: []byte(`42`), skip: "not_object"},
		{name: "envelope with payload null", value: []byte(`{"v":1,"id":"ab","type":"formed","ts":1750000000.5,"payload":null}`),
			want: func(string) string {
				return fmt.Sprintf(`{"topic":%q,"type":"formed","ts":1750000000.5,"payload":{}}`, topic)
			}},
		{name: "envelope with payload array", value: []byte(`{"type":"formed","payload":[1]}`), skip: "bad_payload"},
		{name: "envelope with numeric type", value: []byte(`{"type":5,"payload":{}}`), skip: "bad_type"},
		{name: "invalid UTF-8", value: []byte("{\"s\":\"\xff\xfe\"}"), skip: "invalid_utf8"},
		{name: "2 MiB value", value: padded(2 << 20), skip: "too_large"},
		{name: "1 MiB + 1 byte", value: padded(oneMiB + 1), skip: "too_large"},
		{name: "exactly 1 MiB", value: padded(oneMiB), want: bare(string(padded(oneMiB)))},
		{name: "ts 1e400", value: []byte(`{"type":"formed","ts":1e400,"payload":{"k":1}}`), skip: "bad_ts"},
		{name: "ts as a string", value: []byte(`{"type":"formed","ts":"1750000000","payload":{"k":1}}`), skip: "bad_ts"},
		{name: "hostile strings in the payload", value: []byte(`{"type":"formed","ts":1,"payload":` + hostile + `}`),
			want: func(string) string {
				return fmt.Sprintf(`{"topic":%q,"type":"formed","ts":1,"payload":%s}`, topic, hostile)
			}},
		{name: "hostile type and body topic", value: []byte(`{"topic":"identity.merged\n\nevent: x","type":"a\n\nevent: merged\r","payload":{}}`),
			want: func(ts string) string {
				return fmt.Sprintf(`{"topic":%q,"type":"a\n\nevent: merged\r","ts":%s,"payload":{}}`, topic, ts)
			}},
		{name: "raw CR, LF and tab between tokens", value: []byte("{\r\n\t\"k\" :\r 1 ,\n\"s\":\"v\"\r\n}"), want: bare(`{"k":1,"s":"v"}`)},
		{name: "raw DEL, NEL and LINE SEPARATOR in a string", value: []byte("{\"s\":\"a\x7fb\u0085c\u2028d\"}"),
			want: bare("{\"s\":\"a\x7fb\u0085c\u2028d\"}")},
	}

	var want []string // data lines expected so far, in order
	seq := 0
	good := func() {
		ts := produceValue(t, cl, topic, fmt.Appendf(nil, `{"seq":%d}`, seq))
		want = append(want, numberedData(topic, seq, ts))
		seq++
	}
	good()
	for _, c := range cases {
		before := skippedCounts(t, r.URL)
		ts := produceValue(t, cl, topic, c.value)
		if c.skip == "" {
			want = append(want, c.want(ts))
		}
		good()
		waitViewers(t, []*sseViewer{v}, 60*time.Second, "the record after "+c.name,
			func(v *sseViewer) bool { return len(v.liveEvents()) >= len(want) })
		got := v.liveEvents()
		if len(got) != len(want) {
			t.Fatalf("%s: %d events, want %d", c.name, len(got), len(want))
		}
		for i, f := range got {
			if _, err := ssetest.ParseEvent(f.Raw); err != nil {
				t.Fatalf("%s: event %d: %v", c.name, i, err)
			}
			if f.Event != name || f.Data[0] != want[i] {
				t.Fatalf("%s: event %d is %q with data\n%.300q\nwant %q with\n%.300q", c.name, i, f.Event, f.Data[0], name, want[i])
			}
		}
		after := skippedCounts(t, r.URL)
		for _, reason := range []string{"too_large", "invalid_utf8", "not_json", "not_object",
			"bad_payload", "bad_type", "bad_ts", "bad_topic", "internal"} {
			d, w := after[reason]-before[reason], 0.0
			if reason == c.skip {
				w = 1
			}
			if d != w {
				t.Fatalf("%s: relay_records_skipped_total{reason=%q} went up by %v, want %v", c.name, reason, d, w)
			}
		}
	}

	// The hostile strings reach a browser's JSON.parse as the publisher sent them.
	var hostileWant, hostileGot map[string]string
	if err := json.Unmarshal([]byte(hostile), &hostileWant); err != nil {
		t.Fatal(err)
	}
	for _, f := range v.liveEvents() {
		var ev struct {
			Payload map[string]any `json:"payload"`
		}
		if err := json.Unmarshal([]byte(f.Data[0]), &ev); err != nil {
			t.Fatalf("data %.200q: %v", f.Data[0], err)
		}
		if _, ok := ev.Payload["g"]; ok {
			hostileGot = map[string]string{}
			for k, x := range ev.Payload {
				hostileGot[k], _ = x.(string)
			}
		}
	}
	if fmt.Sprint(hostileGot) != fmt.Sprint(hostileWant) {
		t.Fatalf("hostile payload decoded as %q, want %q", hostileGot, hostileWant)
	}

	time.Sleep(500 * time.Millisecond) // anything delivered late would show now
	if n := len(v.liveEvents()); n != len(want) {
		t.Fatalf("%d events in the end, want %d", n, len(want))
	}
	if ended, err := v.ended(); ended {
		t.Fatalf("the stream ended: %v", err)
	}
	frames, err := ssetest.ParseFrames(v.rawBytes())
	if err != nil {
		t.Fatalf("the whole stream does not parse strictly: %v", err)
	}
	t.Logf("%d cases, %d frames received, all strict", len(cases), len(frames))
}

// TestSlowlorisHeaderTimeout guards: a client sending headers a byte a second is cut off by the 5 s header timeout before its headers complete.
func TestSlowlorisHeaderTimeout(t *testing.T) {
	env, _ := relaytest.TopicEnv(t, nil)
	r := relaytest.Start(t, env)
	req := "GET " + api.EventsPath + "?token=x HTTP/1.1\r\nHost: relay\r\nAccept: text/event-stream\r\n" +
		"X-Slow: " + strings.Repeat("s", 30) + "\r\n\r\n" // about 100 s at a byte a second
	conn, err := net.Dial("tcp", strings.TrimPrefix(r.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	type result struct {
		got []byte
		err error
		at  time.Time
	}
	closed := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(conn)
		closed <- result{b, err, time.Now()}
	}()
	sent := 0
	var res result
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
loop:
	for sent < len(req) {
		if _, err := conn.Write([]byte{req[sent]}); err != nil {
			res = <-closed // the relay closed the connection; the write saw it first
			break
		}
		sent++
		select {
		case res = <-closed:
			break loop
		case <-tick.C:
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("connection still open after %v and %d bytes", time.Since(start), sent)
		}
	}
	took := res.at.Sub(start)
	t.Logf("cut after %v, %d of %d header bytes sent; read %q, %v", took.Round(time.Millisecond), sent, len(req), res.got, res.err)
	if sent >= len(req) {
		t.Fatal("the whole request went through")
	}
	// net/http answers a header timeout with a 400 and closes (older Go
	// versions closed without a word); the stream is never served.
	const timeoutAnswer = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"
	if len(res.got) != 0 && string(res.got) != timeoutAnswer {
		t.Fatalf("the relay answered %q; want the connection closed, after at most %q", res.got, timeoutAnswer)
	}
	if res.err != nil && !errors.Is(res.err, net.ErrClosed) && !strings.Contains(res.err.Error(), "connection reset") {
		t.Fatalf("read ended with %v, want EOF or a reset", res.err)
	}
	// 5 s header timeout: not cut at once (that would be another cause), not much later.
	if took < 4*time.Second || took > 15*time.Second {
		t.Fatalf("cut after %v, want about 5 s", took)
	}
	if code := statusOf(r.URL + "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d after the slowloris", code)
	}
}

// TestAnnouncedBodyNeverSent guards issue 11's connection hoarding: 300
// requests that announce a body and never send it each get a 413 at once and
// are closed by the relay (they used to get no answer for minutes), and the
// relay goes on serving.
func TestAnnouncedBodyNeverSent(t *testing.T) {
	const conns = 300
	env, _ := relaytest.TopicEnv(t, nil)
	r := relaytest.Start(t, env)
	addr := strings.TrimPrefix(r.URL, "http://")
	token := relaytest.ViewerToken(t)
	answers := make(chan error, conns)
	for i := range conns {
		target := api.EventsPath + "?token=" + token
		if i%2 == 1 {
			target = "/healthz"
		}
		go func() {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				answers <- err
				return
			}
			defer conn.Close()
			// Bounds a hang only: the answer comes at once.
			_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.WriteString(conn, "GET "+target+" HTTP/1.1\r\nHost: relay\r\nContent-Length: 10\r\n\r\n"); err != nil {
				answers <- err
				return
			}
			got, err := io.ReadAll(conn) // to the relay's close
			if err != nil && !strings.Contains(err.Error(), "connection reset") {
				answers <- fmt.Errorf("%s: %v after %q", target, err, got)
				return
			}
			if !bytes.HasPrefix(got, []byte("HTTP/1.1 413 ")) || !bytes.HasSuffix(got, []byte(`{"detail":"Request body not allowed"}`)) {
				answers <- fmt.Errorf("%s: answered %q", target, got)
				return
			}
			answers <- nil
		}()
	}
	for range conns {
		if err := <-answers; err != nil {
			t.Fatal(err)
		}
	}
	if code := statusOf(r.URL + "/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d after the requests", code)
	}
	if n := relaytest.Metric(t, r.URL, `relay_connects_total{code="413"}`); n != conns/2 {
		t.Fatalf(`relay_connects_total{code="413"} = %v, want %d`, n, conns/2)
	}
}

// countingViewer reads a stream as fast as it can and checks that its events
// are {"seq":0}, {"seq":1}, ... in order, without keeping them.
type countingViewer struct {
	next     atomic.Int64 // the seq expected next = events received
	maxFrame atomic.Int64 // bytes of the largest event frame
	mu       sync.Mutex
	err      error
}

func (c *countingViewer) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
}

func (c *countingViewer) failure() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *countingViewer) read(body io.Reader) {
	br := bufio.NewReaderSize(body, 64<<10)
	frame := 0
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			c.fail(fmt.Errorf("stream ended after %d events: %w", c.next.Load(), err))
			return
		}
		frame += len(line)
		if bytes.IndexByte(line, '\r') >= 0 {
			c.fail(fmt.Errorf("CR in line %.80q", line))
			return
		}
		if len(line) == 1 {
			frame = 0
			continue
		}
		data, ok := bytes.CutPrefix(line, []byte("data: "))
		if !ok {
			continue
		}
		_, rest, ok := bytes.Cut(data, []byte(`"payload":{"seq":`))
		if !ok {
			continue // the snapshot
		}
		end := bytes.IndexByte(rest, ',')
		n, err := strconv.Atoi(string(rest[:max(end, 0)]))
		if err != nil || int64(n) != c.next.Load() {
			c.fail(fmt.Errorf("event seq %q, want %d", rest[:min(len(rest), 20)], c.next.Load()))
			return
		}
		if int64(frame+1) > c.maxFrame.Load() {
			c.maxFrame.Store(int64(frame + 1))
		}
		c.next.Add(1)
	}
}

// dialStalled sends request and never reads: a viewer that stalls. It
// advertises an Ethernet-sized MSS and a small receive buffer, set before
// connecting: the kernel sizes the relay's send buffer from the MSS, and with
// the 64 KiB loopback MSS 1,000 stalled sockets would hold over a gigabyte
// of kernel memory and push the machine's TCP memory into pressure. The
// connection is closed at the end of the test.
func dialStalled(t *testing.T, addr string, request []byte) net.Conn {
	t.Helper()
	dialer := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var e1, e2 error
		err := c.Control(func(fd uintptr) {
			e1 = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 1460)
			e2 = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		return errors.Join(err, e1, e2)
	}}
	conn, err := dialer.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("stalled viewer: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write(request); err != nil {
		t.Fatalf("stalled viewer: %v", err)
	}
	return conn
}

// TestNonReadingViewersDroppedMemoryBounded guards: 1,000 non-reading viewers are dropped as slow, 100 readers get every frame, relay RSS stays bounded.
func TestNonReadingViewersDroppedMemoryBounded(t *testing.T) {
	const stalled, readers = 1000, 100
	const buffer, windowBytes = 256, 64 << 20 // RELAY_SUBSCRIBER_BUFFER, RELAY_REPLAY_WINDOW_BYTES defaults
	env, topic := relaytest.TopicEnv(t, map[string]string{"RELAY_SSE_MAX_PER_USER": "2000", "RELAY_LOG_LEVEL": "info"})
	r, cl := relaytest.StartOnTopic(t, env, topic, 1)
	pid := r.Pid()
	rssStart := vmRSS(t, pid)
	token := relaytest.ViewerToken(t)

	// The stalled viewers: a request, then never a read.
	addr := strings.TrimPrefix(r.URL, "http://")
	request := []byte("GET " + api.EventsPath + "?token=" + token + " HTTP/1.1\r\nHost: relay\r\nAccept: text/event-stream\r\n\r\n")
	conns := make([]net.Conn, stalled)
	for i := range stalled {
		conns[i] = dialStalled(t, addr, request)
	}
	closeStalled := sync.OnceFunc(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	// The reading viewers, connected at once so that they share a snapshot read.
	client := streamClient(t)
	cvs := make([]*countingViewer, readers)
	bodies := make([]io.ReadCloser, readers)
	errs := make([]error, readers)
	var wg sync.WaitGroup
	for i := range cvs {
		cvs[i] = &countingViewer{}
		wg.Go(func() {
			resp, err := client.Get(r.URL + api.EventsPath + "?token=" + token)
			if err == nil && resp.StatusCode != http.StatusOK {
				resp.Body.Close()
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
			if err != nil {
				errs[i] = err
				return
			}
			bodies[i] = resp.Body
			go cvs[i].read(resp.Body)
		})
	}
	wg.Wait()
	for i, b := range bodies {
		if b != nil {
			t.Cleanup(func() { b.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("reader %d: %v", i, errs[i])
		}
	}
	waitMetricAtLeast(t, r.URL, "relay_viewers_connected", stalled+readers, 60*time.Second)
	rssConnected := vmRSS(t, pid)
	producing := time.Now()

	stopSampling := sampleRSS(pid, rssConnected)

	// Produce in batches of 100, each once every reader is within 100 events:
	// a reader's queue then never holds more than 200 of its 256 frames.
	pad := strings.Repeat("x", 4096)
	produced := 0
	deadline := time.Now().Add(3 * time.Minute)
	slowest := func() int64 {
		m := int64(1 << 62)
		for i, c := range cvs {
			if err := c.failure(); err != nil {
				t.Fatalf("reader %d: %v", i, err)
			}
			m = min(m, c.next.Load())
		}
		return m
	}
	for relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="slow"}`) < stalled {
		if time.Now().After(deadline) {
			t.Fatalf("after %d events, %v stalled viewers dropped as slow, want %d", produced,
				relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="slow"}`), stalled)
		}
		for slowest() < int64(produced-100) {
			if time.Now().After(deadline) {
				t.Fatalf("readers stuck at %d of %d events", slowest(), produced)
			}
			time.Sleep(20 * time.Millisecond)
		}
		recs := make([]*kgo.Record, 100)
		for i := range recs {
			recs[i] = &kgo.Record{Topic: topic, Value: fmt.Appendf(nil, `{"seq":%d,"pad":%q}`, produced+i, pad)}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := cl.ProduceSync(ctx, recs...).FirstErr()
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		produced += len(recs)
	}
	// The relay reset its ends: none lingers closing with unsent bytes (a
	// graceful close would leave every stalled viewer's in FIN_WAIT1).
	if n := closingSockets(t, r.URL); n != 0 {
		t.Fatalf("%d of the relay's sockets are closing with bytes queued, want 0: dropped viewers must be reset", n)
	}
	closeStalled()
	for slowest() < int64(produced) {
		if time.Now().After(deadline) {
			t.Fatalf("readers stuck at %d of %d events", slowest(), produced)
		}
		time.Sleep(20 * time.Millisecond)
	}
	peak := stopSampling()
	t.Logf("%d events produced and read in %v", produced, time.Since(producing).Round(time.Millisecond))
	rssEnd := vmRSS(t, pid)

	for reason, want := range map[string]float64{"slow": stalled, "write_error": 0, "client_gone": 0, "client_sent": 0, "internal": 0} {
		if n := relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="`+reason+`"}`); n != want {
			t.Fatalf("relay_viewer_disconnects_total{reason=%q} = %v, want %v", reason, n, want)
		}
	}
	if n := relaytest.Metric(t, r.URL, "relay_viewers_connected"); n != readers {
		t.Fatalf("relay_viewers_connected = %v, want the %d readers", n, readers)
	}
	time.Sleep(300 * time.Millisecond)
	frame := int64(0)
	for i, c := range cvs {
		if err := c.failure(); err != nil {
			t.Fatalf("reader %d: %v", i, err)
		}
		if got := c.next.Load(); got != int64(produced) {
			t.Fatalf("reader %d received %d events, want all %d", i, got, produced)
		}
		frame = max(frame, c.maxFrame.Load())
	}

	// Worst-case bound: each viewer's queue full (256 frames), as if no frame
	// were shared, plus the replay window (its byte cap, or all events
	// produced if fewer), over the RSS with every viewer connected.
	window := min(int64(produced)*frame, windowBytes)
	bound := rssConnected + (stalled+readers)*buffer*frame + window
	// The relay encodes each frame once and queues pointers to it, so what
	// events add is the window's frames, with GC headroom (GOGC=100 lets the
	// heap reach twice the live data; 4x and 64 MiB spare leave margin).
	shared := rssConnected + 4*window + 64<<20
	t.Logf("%d events of %d-byte frames; VmRSS: started %s, %d viewers connected %s, peak %s, end %s; worst-case bound %s, shared-frame bound %s",
		produced, frame, mib(rssStart), stalled+readers, mib(rssConnected), mib(peak), mib(rssEnd), mib(bound), mib(shared))
	if peak >= bound {
		t.Fatalf("peak VmRSS %s over the worst-case bound %s", mib(peak), mib(bound))
	}
	if peak >= shared {
		t.Fatalf("peak VmRSS %s over the shared-frame bound %s: frames copied per viewer?", mib(peak), mib(shared))
	}
}

// closingSockets counts the relay's TCP sockets (local port that of
// baseURL) that are closed by the relay but not gone: FIN_WAIT1, FIN_WAIT2,
// CLOSING or LAST_ACK in /proc/net/tcp.
func closingSockets(t *testing.T, baseURL string) int {
	t.Helper()
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Skipf("no /proc/net/tcp: %v", err)
	}
	suffix := fmt.Sprintf(":%04X", port)
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasSuffix(f[1], suffix) {
			continue
		}
		switch f[3] { // st
		case "04", "05", "09", "0B":
			n++
		}
	}
	return n
}

// sampleRSS samples the VmRSS of process pid every 20 ms from now on; the
// returned stop ends it and returns the peak (at least from).
func sampleRSS(pid int, from int64) (stop func() int64) {
	peak := from
	done, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if rss, err := readVmRSS(pid); err == nil {
				peak = max(peak, rss)
			}
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() int64 {
		close(done)
		<-sampled
		return peak
	}
}

// mib formats a byte count in MiB.
func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
