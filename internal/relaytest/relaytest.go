// Package relaytest runs the real relay binary for end-to-end tests: it
// builds ./cmd/relay once per test binary, starts processes with a given
// environment, and gives tests tokens, users and SSE streams to work with.
package relaytest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // postgres driver
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/testenv"
	"github.com/decnet/identity-relay/internal/testsync"
	"github.com/decnet/identity-relay/pkg/api"
)

// Secret is the JWT secret every test relay is started with.
const Secret = "relaytest-secret-0123456789abcdef0123456789"

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds ./cmd/relay once and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		dir, err := os.MkdirTemp("", "relaytest-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "relay")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/relay")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// Process is one running relay.
type Process struct {
	URL  string // http://127.0.0.1:port
	cmd  *exec.Cmd
	logs *testsync.Buffer
	done chan struct{}
	err  error
}

// Env returns the settings a test relay needs, pointed at brokers and the test database.
func Env(t testing.TB, brokers []string) map[string]string {
	t.Helper()
	return map[string]string{
		"RELAY_LISTEN_ADDR":      "127.0.0.1:0",
		"RELAY_KAFKA_BROKERS":    strings.Join(brokers, ","),
		"RELAY_DATABASE_URL":     testenv.DatabaseURL(t),
		"RELAY_JWT_SECRET":       Secret,
		"RELAY_LOG_LEVEL":        "debug",
		"RELAY_SHUTDOWN_TIMEOUT": "10s",
	}
}

// Start runs the relay with env (and nothing else of this process's
// environment) and waits until it listens. It is stopped at test cleanup.
func Start(t testing.TB, env map[string]string, args ...string) *Process {
	t.Helper()
	cmd := exec.Command(Binary(t), args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	p := &Process{cmd: cmd, logs: &testsync.Buffer{}, done: make(chan struct{})}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = p.logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			p.logs.WriteString(line + "\n")
			var rec struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "relay listening" {
				select {
				case addr <- rec.Addr:
				default:
				}
			}
		}
	}()
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.Signal(syscall.SIGKILL)
		<-p.done
		if t.Failed() {
			t.Logf("relay logs:\n%s", p.Logs())
		}
	})
	select {
	case a := <-addr:
		p.URL = "http://" + a
	case <-p.done:
		t.Fatalf("relay exited before listening: %v\n%s", p.err, p.Logs())
	case <-time.After(30 * time.Second):
		t.Fatalf("relay did not listen within 30s\n%s", p.Logs())
	}
	return p
}

// Pid returns the process id of the relay (for /proc/<pid>/status).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Logs returns everything the relay wrote so far.
func (p *Process) Logs() string { return p.logs.String() }

// Signal sends sig to the relay; a process that already exited is ignored.
func (p *Process) Signal(sig os.Signal) { _ = p.cmd.Process.Signal(sig) }

// Wait waits for the relay to exit and returns its exit code.
func (p *Process) Wait(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("relay still running after %v", timeout)
		return -1
	}
}

// WaitReady polls /readyz until it answers 200.
func (p *Process) WaitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(p.URL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("relay not ready within 20s\n%s", p.Logs())
}

// DB opens the test database.
func DB(t testing.TB) *sqlx.DB {
	t.Helper()
	db, err := sqlx.Open("postgres", testenv.DatabaseURL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// RandomID returns n random bytes as hex.
func RandomID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// AddUser inserts a user with role and returns its uuid; it is deleted at cleanup.
func AddUser(t testing.TB, db *sqlx.DB, role string) string {
	t.Helper()
	uuid := "user-" + RandomID(8)
	if _, err := db.Exec(`INSERT INTO users (uuid, username, role) VALUES ($1, $2, $3)`, uuid, uuid, role); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(`DELETE FROM users WHERE uuid = $1`, uuid) })
	return uuid
}

// Token mints an HS256 token for user with the usual claims, valid for an hour.
func Token(t testing.TB, secret, user string) string {
	t.Helper()
	return TokenUntil(t, secret, user, RandomID(8), time.Now().Add(time.Hour))
}

// TokenUntil mints an HS256 token for user with the token id jti, issued
// now and expiring at exp.
func TokenUntil(t testing.TB, secret, user, jti string, exp time.Time) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"uuid": user, "jti": jti, "iat": time.Now().Unix(), "exp": exp.Unix(),
	}).SignedString([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Stream is one viewer's SSE connection.
type Stream struct {
	Resp   *http.Response
	br     *bufio.Reader
	cancel context.CancelFunc
	frames chan frameOrErr
	gate   sync.Mutex // held while paused: the reader stops reading the socket
}

// Pause stops reading from the socket, as a stalled browser would.
func (s *Stream) Pause() { s.gate.Lock() }

// Resume reads from the socket again.
func (s *Stream) Resume() { s.gate.Unlock() }

type frameOrErr struct {
	frame string
	err   error
}

// Dial opens the event stream with ?token= and returns it whatever the status.
func Dial(t testing.TB, baseURL, token string) *Stream {
	t.Helper()
	return DialWith(t, baseURL, token, nil)
}

// DialWith is Dial with extra request headers (Last-Event-ID).
func DialWith(t testing.TB, baseURL, token string, header http.Header) *Stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+api.EventsPath+"?token="+token, nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("dial: %v", err)
	}
	s := &Stream{Resp: resp, br: bufio.NewReader(resp.Body), cancel: cancel, frames: make(chan frameOrErr, 256)}
	go s.read()
	t.Cleanup(s.Close)
	return s
}

// Close ends the connection.
func (s *Stream) Close() {
	s.cancel()
	s.Resp.Body.Close()
}

// read splits the body into raw frames: everything up to and including a blank line.
func (s *Stream) read() {
	defer close(s.frames)
	var cur strings.Builder
	for {
		s.gate.Lock()
		s.gate.Unlock() //nolint:staticcheck // an empty critical section: wait while paused
		line, err := s.br.ReadString('\n')
		if err != nil {
			if cur.Len() > 0 || line != "" {
				s.frames <- frameOrErr{frame: cur.String() + line, err: io.ErrUnexpectedEOF}
			} else {
				s.frames <- frameOrErr{err: err}
			}
			return
		}
		cur.WriteString(line)
		if line == "\n" {
			s.frames <- frameOrErr{frame: cur.String()}
			cur.Reset()
		}
	}
}

// Next returns the next whole frame, failing the test after timeout or at
// the end of the stream.
func (s *Stream) Next(t testing.TB, timeout time.Duration) string {
	t.Helper()
	f, err := s.NextOrEnd(timeout)
	if err != nil {
		t.Fatalf("next frame: %v (partial %q)", err, f)
	}
	return f
}

// NextOrEnd returns the next whole frame, or the error that ended the stream
// (io.EOF for a clean end, io.ErrUnexpectedEOF with the partial frame).
func (s *Stream) NextOrEnd(timeout time.Duration) (string, error) {
	select {
	case f, ok := <-s.frames:
		if !ok {
			return "", io.EOF
		}
		return f.frame, f.err
	case <-time.After(timeout):
		return "", fmt.Errorf("no frame within %v", timeout)
	}
}

// NextEvent skips keepalive comments and the retry hint and returns the next event frame.
func (s *Stream) NextEvent(t testing.TB, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		f := s.Next(t, time.Until(deadline))
		if !strings.HasPrefix(f, ":") && !strings.HasPrefix(f, "retry: ") {
			return f
		}
	}
}

// ExpectStart reads the opening keepalive, the retry hint and the snapshot
// frame and returns the snapshot's data.
func (s *Stream) ExpectStart(t testing.TB) string {
	t.Helper()
	if s.Resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(s.br)
		t.Fatalf("status %d: %s", s.Resp.StatusCode, body)
	}
	if f := s.Next(t, 10*time.Second); f != ": keepalive\n\n" {
		t.Fatalf("first frame %q, want keepalive", f)
	}
	if f := s.Next(t, 10*time.Second); !strings.HasPrefix(f, "retry: ") {
		t.Fatalf("second frame %q, want the retry hint", f)
	}
	f := s.Next(t, 10*time.Second)
	data, ok := SnapshotData(f)
	if !ok {
		t.Fatalf("third frame %q, want one snapshot frame", f)
	}
	return data
}

// SnapshotData returns the data of a snapshot frame (its id line, the
// position it was read at, is optional: the relay omits it until it knows a
// partition), or false for any other frame.
func SnapshotData(f string) (string, bool) {
	if rest, ok := strings.CutPrefix(f, "id: "); ok {
		_, f, _ = strings.Cut(rest, "\n")
	}
	data, ok := strings.CutPrefix(f, "event: snapshot\ndata: ")
	if !ok || !strings.HasSuffix(data, "\n\n") || strings.Count(data, "\n") != 2 {
		return "", false
	}
	return strings.TrimSuffix(data, "\n\n"), true
}

// Get fetches url and returns its body, failing on a non-200 status.
func Get(t testing.TB, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	return string(b)
}

// SplitID splits an event frame into its id and the rest of the frame.
func SplitID(t testing.TB, frame string) (id, rest string) {
	t.Helper()
	line, rest, ok := strings.Cut(frame, "\n")
	id, isID := strings.CutPrefix(line, "id: ")
	if !ok || !isID || id == "" {
		t.Fatalf("frame without a leading id line: %q", frame)
	}
	return id, rest
}

// Producer returns a Kafka client for producing test records; closed at cleanup.
func Producer(t testing.TB, brokers []string) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.AllowAutoTopicCreation(), kgo.ProducerLinger(0),
		kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// CreateTopic creates a topic with partitions partitions and waits until it
// is usable; a topic that exists already must have as many.
func CreateTopic(t testing.TB, cl *kgo.Client, topic string, partitions int32) {
	t.Helper()
	if got := EnsureTopic(t, cl, topic, partitions); got != partitions {
		t.Fatalf("topic %s exists with %d partitions, want %d", topic, got, partitions)
	}
}

// EnsureTopic creates topic with partitions partitions unless the broker
// has it already, waits until it is usable and returns its partition count.
func EnsureTopic(t testing.TB, cl *kgo.Client, topic string, partitions int32) int32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	adm := kadm.NewClient(cl)
	_, err := adm.CreateTopic(ctx, partitions, 1, nil, topic) // kadm returns the topic's own error too
	switch {
	case err == nil:
		WaitTopic(ctx, t, adm, topic, partitions)
		return partitions
	case !errors.Is(err, kerr.TopicAlreadyExists):
		t.Fatalf("create topic %s: %v", topic, err)
	}
	return waitTopic(ctx, t, adm, topic, func(n int) bool { return n > 0 })
}

// WaitTopic waits until the broker lists topic with its partitions.
func WaitTopic(ctx context.Context, t testing.TB, adm *kadm.Client, topic string, partitions int32) {
	t.Helper()
	waitTopic(ctx, t, adm, topic, func(n int) bool { return n == int(partitions) })
}

// waitTopic waits until the broker lists topic with a partition count that
// ok accepts, and returns it.
func waitTopic(ctx context.Context, t testing.TB, adm *kadm.Client, topic string, ok func(int) bool) int32 {
	t.Helper()
	for ctx.Err() == nil {
		md, err := adm.Metadata(ctx, topic)
		if d, listed := md.Topics[topic]; err == nil && listed && d.Err == nil && ok(len(d.Partitions)) {
			return int32(len(d.Partitions))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("topic %s not ready", topic)
	return 0
}

// Produce writes value to topic's partition and waits for the broker's ack.
func Produce(t testing.TB, cl *kgo.Client, topic string, partition int32, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r := &kgo.Record{Topic: topic, Partition: partition, Value: []byte(value)}
	if err := cl.ProduceSync(ctx, r).FirstErr(); err != nil {
		t.Fatalf("produce to %s/%d: %v", topic, partition, err)
	}
}

// Metric returns the value of the sample of /metrics whose name and labels
// are given exactly as exposed, e.g. `relay_viewer_disconnects_total{reason="slow"}`;
// 0 when the sample is absent.
func Metric(t testing.TB, baseURL, sample string) float64 {
	t.Helper()
	for _, line := range strings.Split(Get(t, baseURL+"/metrics"), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err != nil {
				t.Fatalf("metric %s: %v", line, err)
			}
			return f
		}
	}
	return 0
}
