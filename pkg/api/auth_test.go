package api

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/internal/testsync"
	"github.com/decnet/identity-relay/internal/users"
	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

const (
	testSecret   = "test-secret-of-at-least-32-chars-0123456789"
	testSnapshot = `[{"uuid":"i1","notes":null},{"uuid":"i2","notes":"x"}]`

	bodyCredentials = `{"detail":"Could not validate credentials"}`
	bodyPermissions = `{"detail":"Insufficient permissions"}`
	bodyPassword    = `{"detail":"Password change required before accessing this resource"}`
	bodyDBDown      = `{"detail":"Database unavailable"}`
	bodyShutdown    = `{"detail":"Shutting down"}`
	bodyTooMany     = `{"detail":"Connection limit reached"}`
)

// wantStreamStart is what every new viewer reads first: the keepalive
// comment, the retry hint (default 3 s), the snapshot (wantSnapshot, after
// its id line: the position it was read at).
const (
	wantStreamStart = ": keepalive\n\nretry: 3000\n\n"
	wantSnapshot    = "event: snapshot\ndata: {\"identities\":" + testSnapshot + "}\n\n"
)

// cutoff is a tokens_valid_from with fractional seconds; floor = 1750000000.
var (
	cutoff      = time.Unix(1750000000, 750_000_000)
	cutoffFloor = int64(1750000000)
	// cutoffNano is within 128 ns of the next second: float64 epoch
	// nanoseconds round it up to 1750000001.
	cutoffNano = time.Unix(1750000000, 999_999_999)
)

// testUsers are the rows of the fake users table.
func testUsers() map[string]*users.User {
	return map[string]*users.User{
		"u-viewer":      {UUID: "u-viewer", Username: "vic", Role: "viewer"},
		"u-viewer2":     {UUID: "u-viewer2", Username: "val", Role: "viewer"},
		"u-admin":       {UUID: "u-admin", Username: "ada", Role: "admin"},
		"u-auditor":     {UUID: "u-auditor", Username: "aud", Role: "auditor"},
		"u-norole":      {UUID: "u-norole", Username: "nor", Role: ""},
		"u-mustchange":  {UUID: "u-mustchange", Username: "mcp", Role: "admin", MustChangePassword: true},
		"u-cutoff":      {UUID: "u-cutoff", Username: "cut", Role: "viewer", TokensValidFrom: &cutoff},
		"u-cutoff-nano": {UUID: "u-cutoff-nano", Username: "nan", Role: "viewer", TokensValidFrom: &cutoffNano},
	}
}

// fakeStore is an in-memory Store. Its fields are set before the server
// starts, and changed after only through update.
type fakeStore struct {
	mu       sync.Mutex
	users    map[string]*users.User
	revoked  map[string]bool
	snapshot string
	// errs makes the named method ("User", "Revoked", "Snapshot") fail.
	errs map[string]error
	// blocks makes the named method wait for its context to end, as a
	// database that does not answer, or for gate to be closed.
	blocks map[string]bool
	gate   chan struct{}

	userCalls, revokedCalls, snapshotCalls, pingCalls atomic.Int64
}

func newFakeStore() *fakeStore {
	return &fakeStore{users: testUsers(), revoked: map[string]bool{"jti-revoked": true}, snapshot: testSnapshot}
}

// update changes the store while the server runs, as the database would.
func (s *fakeStore) update(change func(*fakeStore)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	change(s)
}

func (s *fakeStore) call(ctx context.Context, method string) error {
	s.mu.Lock()
	block, err := s.blocks[method], s.errs[method]
	s.mu.Unlock()
	if block {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.gate:
		}
	}
	return err
}

func (s *fakeStore) User(ctx context.Context, uuid string) (*users.User, error) {
	s.userCalls.Add(1)
	if err := s.call(ctx, "User"); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[uuid]
	if !ok {
		return nil, nil
	}
	cp := *u
	return &cp, nil
}

func (s *fakeStore) Revoked(ctx context.Context, jti string) (bool, error) {
	s.revokedCalls.Add(1)
	if err := s.call(ctx, "Revoked"); err != nil {
		return false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.revoked[jti], nil
}

func (s *fakeStore) Snapshot(ctx context.Context, limit int) (json.RawMessage, error) {
	s.snapshotCalls.Add(1)
	if err := s.call(ctx, "Snapshot"); err != nil {
		return nil, err
	}
	return json.RawMessage(s.snapshot), nil
}

func (s *fakeStore) Ping(ctx context.Context) error {
	s.pingCalls.Add(1)
	return s.call(ctx, "Ping")
}

// harness is one relay API over real HTTP.
type harness struct {
	srv    *Server
	url    string
	store  *fakeStore
	broker *fanout.Broadcaster
	client *http.Client
	logs   *testsync.Buffer

	mu       sync.Mutex
	tokens   []string   // every credential sent, to look for in the logs
	accepted []net.Conn // the server's side of every connection
	lastBody io.Reader  // the body of the last stream resumeFrom opened
}

// recordingListener hands h every connection the server accepts.
type recordingListener struct {
	net.Listener
	h *harness
}

func (l recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.h.mu.Lock()
		l.h.accepted = append(l.h.accepted, c)
		l.h.mu.Unlock()
	}
	return c, err
}

// testConfig is the configuration of the tests: CONTRACT.md's defaults.
func testConfig() Config {
	return Config{
		JWTSecret:      []byte(testSecret),
		JWTLeeway:      5 * time.Second,
		MaxPerUser:     5,
		MaxConnections: 100,
		Keepalive:      time.Minute,
		SnapshotLimit:  50,
		DBTimeout:      2 * time.Second,
		WriteTimeout:   5 * time.Second,
		AuthCacheTTL:   10 * time.Second,
	}
}

// newHarness starts the API with store and cfg changed by mod. At the end
// of the test it checks that the logs hold requests but no credential.
func newHarness(t *testing.T, store *fakeStore, mod func(*Config)) *harness {
	t.Helper()
	return newHarnessOn(t, store, fanout.New(fanout.Options{Buffer: 16}), mod)
}

// newHarnessOn is newHarness on a broker of the test's own.
func newHarnessOn(t *testing.T, store *fakeStore, broker *fanout.Broadcaster, mod func(*Config)) *harness {
	t.Helper()
	cfg := testConfig()
	if mod != nil {
		mod(&cfg)
	}
	h := &harness{store: store, logs: &testsync.Buffer{}, broker: broker}
	cfg.Logger = slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	t.Cleanup(func() { h.checkLogs(t) }) // runs last, once every request has ended
	srv, err := New(cfg, store, h.broker)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	h.srv = srv
	ts := httptest.NewUnstartedServer(srv.Handler())
	ts.Config = srv.HTTPServer()
	ts.Listener = recordingListener{ts.Listener, h}
	ts.Start()
	t.Cleanup(ts.Close)
	h.url = ts.URL + EventsPath
	h.client = &http.Client{Transport: &http.Transport{}}
	t.Cleanup(h.client.CloseIdleConnections)
	t.Cleanup(func() { _ = h.broker.Close() }) // runs first: ends open streams
	return h
}

// waitReturned waits until a handler has returned: it logs the request last.
func (h *harness) waitReturned(t *testing.T) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(h.logs.String(), `"msg":"request"`); {
		if time.Now().After(deadline) {
			t.Fatal("the handler never returned")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkLogs asserts that the logs were captured and hold no credential. A
// stream can end before its handler has logged the request: it waits for
// that line (waitReturned).
func (h *harness) checkLogs(t *testing.T) {
	t.Helper()
	h.waitReturned(t)
	logs := h.logs.String()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, tok := range h.tokens {
		if len(tok) < 8 {
			continue // "x" and the like would match any text
		}
		if strings.Contains(logs, tok) {
			t.Errorf("the logs hold the credential %.40q...", tok)
		}
		// The signature alone is secret enough to leak.
		if parts := strings.Split(tok, "."); len(parts) == 3 && len(parts[2]) >= 16 && strings.Contains(logs, parts[2]) {
			t.Errorf("the logs hold the signature of %.40q...", tok)
		}
	}
}

// request builds a request with an Authorization header and a token query
// parameter (each left out when empty), cancelled at the end of the test.
func (h *harness) request(t *testing.T, authz, query string) *http.Request {
	t.Helper()
	h.mu.Lock()
	h.tokens = append(h.tokens, authz, strings.TrimPrefix(authz, "Bearer "), query)
	h.mu.Unlock()
	u := h.url
	if query != "" {
		u += "?token=" + url.QueryEscape(query)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	return req
}

// get connects (see request). The response body is closed at the end of the
// test at the latest.
func (h *harness) get(t *testing.T, authz, query string) *http.Response {
	t.Helper()
	resp, err := h.client.Do(h.request(t, authz, query))
	if err != nil {
		t.Fatalf("GET: %v", err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// checkRefused asserts a refusal: status, exact JSON body, headers.
func checkRefused(t *testing.T, resp *http.Response, code int, body string) {
	t.Helper()
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	if resp.StatusCode != code || string(got) != body {
		t.Fatalf("got %d %q, want %d %q", resp.StatusCode, got, code, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	wantAuth := ""
	if code == http.StatusUnauthorized {
		wantAuth = "Bearer"
	}
	if got := resp.Header.Values("WWW-Authenticate"); strings.Join(got, ",") != wantAuth {
		t.Errorf("WWW-Authenticate %q, want %q", got, wantAuth)
	}
}

// checkStream asserts an accepted viewer: 200, the SSE headers, then the
// keepalive comment, the retry hint and the snapshot, byte for byte, its
// id (if any) a position the relay parses; it returns that id. The stream
// stays open.
func checkStream(t *testing.T, resp *http.Response) string {
	t.Helper()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("got %d %q, want 200", resp.StatusCode, b)
	}
	for k, want := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache",
		"X-Accel-Buffering": "no",
	} {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("%s %q, want %q", k, got, want)
		}
	}
	if got := resp.Header.Get("WWW-Authenticate"); got != "" {
		t.Errorf("WWW-Authenticate %q on a 200", got)
	}
	got := make([]byte, len(wantStreamStart))
	if _, err := io.ReadFull(resp.Body, got); err != nil {
		t.Fatalf("read stream start: %v (got %q)", err, got)
	}
	if string(got) != wantStreamStart {
		t.Fatalf("stream starts %q, want %q", got, wantStreamStart)
	}
	// Byte by byte up to the frame's end: the caller reads on from resp.Body.
	var snap []byte
	for !bytes.HasSuffix(snap, []byte("\n\n")) {
		b := make([]byte, 1)
		if _, err := io.ReadFull(resp.Body, b); err != nil {
			t.Fatalf("read the snapshot frame: %v (got %q)", err, snap)
		}
		snap = append(snap, b...)
	}
	// The id line is there once the broker knows a partition (snapshotFrame).
	var id string
	if rest, ok := strings.CutPrefix(string(snap), "id: "); ok {
		id, rest, _ = strings.Cut(rest, "\n")
		if _, err := sse.ParsePosition(id); err != nil || rest != wantSnapshot {
			t.Fatalf("snapshot frame %q (id: %v), want %q after the id", snap, err, wantSnapshot)
		}
	} else if string(snap) != wantSnapshot {
		t.Fatalf("snapshot frame %q, want %q", snap, wantSnapshot)
	}
	frames, err := ssetest.ParseFrames(append(got, snap...))
	if err != nil || len(frames) != 3 || !frames[0].IsComment() || frames[1].Retry != "3000" || frames[2].Event != "snapshot" || frames[2].ID != id {
		t.Fatalf("stream start %q parses to %+v, %v", got, frames, err)
	}
	return id
}

// signed returns claims signed with method and key.
func signed(t *testing.T, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatalf("sign: %v", err)
	}
	return s
}

// hs256 returns claims signed as the relay expects.
func hs256(t *testing.T, claims jwt.MapClaims) string {
	t.Helper()
	return signed(t, jwt.SigningMethodHS256, []byte(testSecret), claims)
}

// claimsFor returns valid claims for user; mod edits them (nil values delete).
func claimsFor(user string, mod jwt.MapClaims) jwt.MapClaims {
	now := time.Now()
	c := jwt.MapClaims{
		"uuid": user,
		"sub":  "ignored",
		"jti":  "jti-" + user,
		"iat":  now.Add(-time.Minute).Unix(),
		"exp":  now.Add(time.Hour).Unix(),
	}
	for k, v := range mod {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
}

// rawToken joins a header and claims, base64url-encoded, with sig.
func rawToken(t *testing.T, header, claims any, sig string) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	return enc(header) + "." + enc(claims) + "." + sig
}

// TestAuth guards CONTRACT.md "Authentication and authorization" over real
// HTTP: every credential case gets its exact status, body and headers.
func TestAuth(t *testing.T) {
	h := newHarness(t, newFakeStore(), nil)

	viewer := hs256(t, claimsFor("u-viewer", nil))
	admin := hs256(t, claimsFor("u-admin", nil))

	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	huge := hs256(t, claimsFor("u-viewer", jwt.MapClaims{"pad": strings.Repeat("x", 16<<10)}))
	if len(huge) < 16<<10 {
		t.Fatalf("huge token is %d bytes", len(huge))
	}
	large := hs256(t, claimsFor("u-viewer", jwt.MapClaims{"pad": strings.Repeat("x", 5500)}))
	if len(large) > MaxTokenBytes || len(large) < MaxTokenBytes-1024 {
		t.Fatalf("large token is %d bytes, want just under %d", len(large), MaxTokenBytes)
	}
	noneClaims := claimsFor("u-admin", nil)
	parts := strings.Split(viewer, ".")
	tampered := parts[0] + "." + strings.Split(rawToken(t, nil, claimsFor("u-admin", nil), ""), ".")[1] + "." + parts[2]
	now := time.Now()

	tests := []struct {
		name          string
		header, query string
		code          int // 200: a stream
		body          string
	}{
		// Accepted.
		{name: "viewer by query", query: viewer, code: 200},
		{name: "viewer by header", header: "Bearer " + viewer, code: 200},
		{name: "admin", query: admin, code: 200},
		{name: "token just under the size limit", query: large, code: 200},
		{name: "no iat, user without a cut-off", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"iat": nil})), code: 200},

		// No or unreadable credential.
		{name: "no credential", code: 401, body: bodyCredentials},
		{name: "16 KiB token by query", query: huge, code: 401, body: bodyCredentials},
		{name: "16 KiB token by header", header: "Bearer " + huge, code: 401, body: bodyCredentials},
		{name: "not a JWT", query: "not-a-jwt", code: 401, body: bodyCredentials},
		{name: "two segments", query: parts[0] + "." + parts[1], code: 401, body: bodyCredentials},
		{name: "four segments", query: viewer + ".x", code: 401, body: bodyCredentials},
		{name: "empty segments", query: "..", code: 401, body: bodyCredentials},
		{name: "signature removed", query: parts[0] + "." + parts[1] + ".", code: 401, body: bodyCredentials},
		{name: "segment not base64", query: parts[0] + ".!!!." + parts[2], code: 401, body: bodyCredentials},
		{name: "claims tampered, signature kept", query: tampered, code: 401, body: bodyCredentials},

		// Algorithms.
		{name: "alg none, no signature", query: rawToken(t, map[string]string{"alg": "none", "typ": "JWT"}, noneClaims, ""), code: 401, body: bodyCredentials},
		{name: "alg None, no signature", query: rawToken(t, map[string]string{"alg": "None", "typ": "JWT"}, noneClaims, ""), code: 401, body: bodyCredentials},
		{name: "alg none with a signature", query: rawToken(t, map[string]string{"alg": "none"}, noneClaims, parts[2]), code: 401, body: bodyCredentials},
		{name: "HS512 with the right secret", query: signed(t, jwt.SigningMethodHS512, []byte(testSecret), claimsFor("u-viewer", nil)), code: 401, body: bodyCredentials},
		{name: "HS384 with the right secret", query: signed(t, jwt.SigningMethodHS384, []byte(testSecret), claimsFor("u-viewer", nil)), code: 401, body: bodyCredentials},
		{name: "RS256 with a generated key", query: signed(t, jwt.SigningMethodRS256, rsaKey, claimsFor("u-admin", nil)), code: 401, body: bodyCredentials},
		{name: "HS256 with a wrong secret", query: signed(t, jwt.SigningMethodHS256, []byte(testSecret+"x"), claimsFor("u-viewer", nil)), code: 401, body: bodyCredentials},

		// Claims.
		{name: "expired", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"exp": now.Add(-time.Minute).Unix()})), code: 401, body: bodyCredentials},
		{name: "nbf in the future", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"nbf": now.Add(time.Hour).Unix()})), code: 401, body: bodyCredentials},
		// Clock skew: DECNET's clock 2 s ahead is within the 5 s leeway; 10 s is not. exp gets none.
		{name: "iat 2 s in the future, within the leeway", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"iat": now.Add(2 * time.Second).Unix()})), code: 200},
		{name: "nbf 2 s in the future, within the leeway", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"nbf": now.Add(2 * time.Second).Unix()})), code: 200},
		{name: "iat 10 s in the future, beyond the leeway", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"iat": now.Add(10 * time.Second).Unix()})), code: 401, body: bodyCredentials},
		{name: "nbf 10 s in the future, beyond the leeway", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"nbf": now.Add(10 * time.Second).Unix()})), code: 401, body: bodyCredentials},
		{name: "exp 2 s ago, no leeway on exp", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"exp": now.Add(-2 * time.Second).Unix()})), code: 401, body: bodyCredentials},
		{name: "missing uuid, sub names the user", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"uuid": nil, "sub": "u-viewer"})), code: 401, body: bodyCredentials},
		{name: "uuid not a string", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"uuid": 7})), code: 401, body: bodyCredentials},
		{name: "missing jti", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"jti": nil})), code: 401, body: bodyCredentials},
		{name: "missing exp", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"exp": nil})), code: 401, body: bodyCredentials},
		{name: "unknown user", query: hs256(t, claimsFor("u-nobody", nil)), code: 401, body: bodyCredentials},
		{name: "revoked jti", query: hs256(t, claimsFor("u-viewer", jwt.MapClaims{"jti": "jti-revoked"})), code: 401, body: bodyCredentials},

		// tokens_valid_from (1750000000.75; floor 1750000000).
		{name: "iat a second before floor(tokens_valid_from)", query: hs256(t, claimsFor("u-cutoff", jwt.MapClaims{"iat": cutoffFloor - 1})), code: 401, body: bodyCredentials},
		{name: "iat half a second before floor(tokens_valid_from)", query: hs256(t, claimsFor("u-cutoff", jwt.MapClaims{"iat": float64(cutoffFloor) - 0.5})), code: 401, body: bodyCredentials},
		{name: "iat equal to floor(tokens_valid_from)", query: hs256(t, claimsFor("u-cutoff", jwt.MapClaims{"iat": cutoffFloor})), code: 200},
		{name: "iat between floor and tokens_valid_from", query: hs256(t, claimsFor("u-cutoff", jwt.MapClaims{"iat": float64(cutoffFloor) + 0.5})), code: 200},
		{name: "iat after tokens_valid_from", query: hs256(t, claimsFor("u-cutoff", nil)), code: 200},
		{name: "iat equal to floor, tokens_valid_from 1 ns before the next second", query: hs256(t, claimsFor("u-cutoff-nano", jwt.MapClaims{"iat": cutoffFloor})), code: 200},
		{name: "no iat, user with a cut-off", query: hs256(t, claimsFor("u-cutoff", jwt.MapClaims{"iat": nil})), code: 401, body: bodyCredentials},

		// Authorization.
		{name: "must_change_password", query: hs256(t, claimsFor("u-mustchange", nil)), code: 403, body: bodyPassword},
		{name: "role auditor", query: hs256(t, claimsFor("u-auditor", nil)), code: 403, body: bodyPermissions},
		{name: "empty role", query: hs256(t, claimsFor("u-norole", nil)), code: 403, body: bodyPermissions},

		// Where the credential comes from.
		{name: "valid header wins over a bad query", header: "Bearer " + viewer, query: "garbage.garbage.garbage", code: 200},
		{name: "bad header wins over a valid query", header: "Bearer garbage.garbage.garbage", query: viewer, code: 401, body: bodyCredentials},
		{name: "expired header wins over a valid query", header: "Bearer " + hs256(t, claimsFor("u-viewer", jwt.MapClaims{"exp": now.Add(-time.Minute).Unix()})), query: viewer, code: 401, body: bodyCredentials},
		{name: "Basic header ignored, query used", header: "Basic dXNlcjpwYXNzd29yZA==", query: viewer, code: 200},
		{name: "lowercase bearer ignored, query used", header: "bearer " + viewer, query: admin, code: 200},
		{name: "lowercase bearer ignored, no query", header: "bearer " + viewer, code: 401, body: bodyCredentials},
		{name: "uppercase BEARER ignored, no query", header: "BEARER " + viewer, code: 401, body: bodyCredentials},
		{name: "bare token header ignored, no query", header: viewer, code: 401, body: bodyCredentials},
		{name: "Bearer without a token, query used", header: "Bearer ", query: viewer, code: 200},
		{name: "Bearer without a space, query used", header: "Bearer", query: viewer, code: 200},
		{name: "bad header, bad query", header: "Bearer x.y.z", query: "a.b.c", code: 401, body: bodyCredentials},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := h.get(t, tt.header, tt.query)
			if tt.code == http.StatusOK {
				checkStream(t, resp)
				return
			}
			checkRefused(t, resp, tt.code, tt.body)
		})
	}
}

// TestAuthIssuerAudience guards the optional iss and aud checks.
func TestAuthIssuerAudience(t *testing.T) {
	h := newHarness(t, newFakeStore(), func(c *Config) {
		c.JWTIssuer, c.JWTAudience = "decnet", "decnet-web"
	})
	tests := []struct {
		name   string
		claims jwt.MapClaims
		code   int
	}{
		{"right issuer and audience", jwt.MapClaims{"iss": "decnet", "aud": "decnet-web"}, 200},
		{"audience in a list", jwt.MapClaims{"iss": "decnet", "aud": []string{"other", "decnet-web"}}, 200},
		{"wrong issuer", jwt.MapClaims{"iss": "evil", "aud": "decnet-web"}, 401},
		{"wrong audience", jwt.MapClaims{"iss": "decnet", "aud": "other"}, 401},
		{"issuer differs in case", jwt.MapClaims{"iss": "DECNET", "aud": "decnet-web"}, 401},
		{"missing issuer", jwt.MapClaims{"aud": "decnet-web"}, 401},
		{"missing audience", jwt.MapClaims{"iss": "decnet"}, 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := h.get(t, "", hs256(t, claimsFor("u-viewer", tt.claims)))
			if tt.code == http.StatusOK {
				checkStream(t, resp)
				return
			}
			checkRefused(t, resp, tt.code, bodyCredentials)
		})
	}
}

// waitOpen waits until user holds n stream slots: a closed stream frees its
// slot when the server sees the connection go, not at once.
func (h *harness) waitOpen(t *testing.T, user string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		h.srv.limits.mu.Lock()
		got := h.srv.limits.perUser[user]
		h.srv.limits.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("user %s holds %d streams, want %d", user, got, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPerUserCap guards the per-user stream cap: a real 429 with the
// configured number before any header, other users unaffected, and a closed
// stream freeing its slot.
func TestPerUserCap(t *testing.T) {
	tests := []struct {
		name string
		cap  int // 0: the default config
		want string
	}{
		{"default cap 5", 0, `{"detail":"SSE connection limit (5) reached"}`},
		{"cap 3", 3, `{"detail":"SSE connection limit (3) reached"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeStore(), func(c *Config) {
				if tt.cap != 0 {
					c.MaxPerUser = tt.cap
				}
			})
			limit := h.srv.cfg.MaxPerUser
			viewer := hs256(t, claimsFor("u-viewer", nil))
			var open []*http.Response
			for range limit {
				resp := h.get(t, "Bearer "+viewer, "")
				checkStream(t, resp)
				open = append(open, resp)
			}
			checkRefused(t, h.get(t, "Bearer "+viewer, ""), http.StatusTooManyRequests, tt.want)
			checkRefused(t, h.get(t, "", viewer), http.StatusTooManyRequests, tt.want)

			// Another user has slots of their own.
			checkStream(t, h.get(t, "", hs256(t, claimsFor("u-viewer2", nil))))

			open[0].Body.Close()
			h.waitOpen(t, "u-viewer", limit-1)
			checkStream(t, h.get(t, "", viewer))
			checkRefused(t, h.get(t, "", viewer), http.StatusTooManyRequests, tt.want)
		})
	}
}

// TestRefusedWith503 guards the 503 cases: global cap, database down or
// not answering (within DBTimeout), shutting down. Each holds no slot after.
func TestRefusedWith503(t *testing.T) {
	dbDown := errors.New("dial tcp 127.0.0.1:5432: connect: connection refused")
	const dbTimeout = 300 * time.Millisecond
	tests := []struct {
		name   string
		store  func(*fakeStore)
		before func(t *testing.T, h *harness) // opens streams, drains, ...
		body   string
		// blocked: the database does not answer; the 503 must come within
		// DBTimeout (plus slack, the wait for a shared snapshot query to start).
		blocked bool
		slack   time.Duration
	}{
		{
			name: "global cap",
			before: func(t *testing.T, h *harness) {
				checkStream(t, h.get(t, "", hs256(t, claimsFor("u-admin", nil))))
				checkStream(t, h.get(t, "", hs256(t, claimsFor("u-viewer2", nil))))
			},
			body: bodyTooMany,
		},
		{name: "user lookup fails", store: func(s *fakeStore) { s.errs = map[string]error{"User": dbDown} }, body: bodyDBDown},
		{name: "revocation lookup fails", store: func(s *fakeStore) { s.errs = map[string]error{"Revoked": dbDown} }, body: bodyDBDown},
		{name: "snapshot fails", store: func(s *fakeStore) { s.errs = map[string]error{"Snapshot": dbDown} }, body: bodyDBDown},
		{name: "snapshot not JSON", store: func(s *fakeStore) { s.snapshot = `[{"uuid":` }, body: bodyDBDown},
		{name: "user lookup hangs", store: func(s *fakeStore) { s.blocks = map[string]bool{"User": true} }, body: bodyDBDown, blocked: true},
		{name: "revocation lookup hangs", store: func(s *fakeStore) { s.blocks = map[string]bool{"Revoked": true} }, body: bodyDBDown, blocked: true},
		{name: "snapshot hangs", store: func(s *fakeStore) { s.blocks = map[string]bool{"Snapshot": true} }, body: bodyDBDown, blocked: true},
		{name: "draining", before: func(t *testing.T, h *harness) { h.srv.Drain() }, body: bodyShutdown},
		{name: "broker closed", before: func(t *testing.T, h *harness) { _ = h.broker.Close() }, body: bodyShutdown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := newFakeStore()
			if tt.store != nil {
				tt.store(store)
			}
			h := newHarness(t, store, func(c *Config) {
				c.MaxConnections = 2
				c.DBTimeout = dbTimeout
			})
			if tt.before != nil {
				tt.before(t, h)
			}
			h.srv.limits.mu.Lock()
			open := h.srv.limits.total
			h.srv.limits.mu.Unlock()
			start := time.Now()
			resp := h.get(t, "", hs256(t, claimsFor("u-viewer", nil)))
			elapsed := time.Since(start)
			checkRefused(t, resp, http.StatusServiceUnavailable, tt.body)
			if tt.blocked && (elapsed < dbTimeout || elapsed > dbTimeout+tt.slack+time.Second) {
				t.Errorf("answered after %v, want within the DBTimeout %v (+%v)", elapsed, dbTimeout, tt.slack)
			}
			h.waitOpen(t, "u-viewer", 0)
			h.srv.limits.mu.Lock()
			total := h.srv.limits.total
			h.srv.limits.mu.Unlock()
			if total != open {
				t.Errorf("%d slots taken after the refusal, want %d", total, open)
			}
		})
	}
}

// TestAuthCache guards the lookup cache: within the TTL a reconnect costs no
// query; without a TTL every connect queries. The snapshot is shared apart.
func TestAuthCache(t *testing.T) {
	tests := []struct {
		name      string
		ttl       time.Duration
		wantCalls int64
	}{
		{"10 s TTL", 10 * time.Second, 1},
		{"no cache", 0, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := newFakeStore()
			h := newHarness(t, store, func(c *Config) { c.AuthCacheTTL = tt.ttl })
			tok := hs256(t, claimsFor("u-viewer", nil))
			for range 2 {
				resp := h.get(t, "", tok)
				checkStream(t, resp)
				resp.Body.Close()
			}
			if got := store.userCalls.Load(); got != tt.wantCalls {
				t.Errorf("%d User lookups, want %d", got, tt.wantCalls)
			}
			if got := store.revokedCalls.Load(); got != tt.wantCalls {
				t.Errorf("%d Revoked lookups, want %d", got, tt.wantCalls)
			}
			if got := store.snapshotCalls.Load(); got != 1 {
				t.Errorf("%d snapshots, want 1 (shared within snapshotMaxAge, whatever the auth TTL)", got)
			}
		})
	}
}

// TestTokenFrom guards where the credential is taken from (CONTRACT.md).
func TestTokenFrom(t *testing.T) {
	tests := []struct {
		name, header, query, want string
	}{
		{"header", "Bearer h", "", "h"},
		{"header wins", "Bearer h", "q", "h"},
		{"query", "", "q", "q"},
		{"neither", "", "", ""},
		{"lowercase scheme", "bearer h", "q", "q"},
		{"Basic", "Basic aDpw", "q", "q"},
		{"empty bearer", "Bearer ", "q", "q"},
		{"no space", "Bearer", "q", "q"},
		{"tab instead of space", "Bearer\th", "q", "q"},
		{"leading space", " Bearer h", "q", "q"},
		{"rest kept whole", "Bearer  h x", "q", " h x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tokenFrom(tt.header, tt.query); got != tt.want {
				t.Errorf("tokenFrom(%q, %q) = %q, want %q", tt.header, tt.query, got, tt.want)
			}
		})
	}
}

// waitCalls waits until n reports want.
func waitCalls(t *testing.T, what string, n *atomic.Int64, want int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for n.Load() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%d %s, want %d", n.Load(), what, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestSharedLookupOutlivesItsViewer guards the sharing of one user lookup by
// concurrent viewers: the viewer whose request started it going away must
// not fail the lookup for the others (a 503 for a viewer whose database is
// fine).
func TestSharedLookupOutlivesItsViewer(t *testing.T) {
	store := newFakeStore()
	store.blocks = map[string]bool{"User": true}
	store.gate = make(chan struct{})
	h := newHarness(t, store, nil)
	tok := hs256(t, claimsFor("u-viewer", nil))

	// The first viewer starts the lookup, then leaves.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := make(chan error, 1)
	req1 := h.request(t, "", tok).WithContext(ctx)
	go func() {
		resp, err := h.client.Do(req1)
		if err == nil {
			resp.Body.Close()
		}
		first <- err
	}()
	waitCalls(t, "User lookups", &store.userCalls, 1)

	// The second viewer joins the lookup under way.
	type result struct {
		resp *http.Response
		err  error
	}
	second := make(chan result, 1)
	req := h.request(t, "Bearer "+tok, "")
	go func() {
		resp, err := h.client.Do(req)
		second <- result{resp, err}
	}()
	time.Sleep(200 * time.Millisecond)
	cancel()
	if err := <-first; err == nil {
		t.Fatal("the first viewer's request was not cancelled")
	}
	time.Sleep(200 * time.Millisecond) // let the server see the first viewer go
	close(store.gate)                  // the database answers

	select {
	case r := <-second:
		if r.err != nil {
			t.Fatalf("second viewer: %v", r.err)
		}
		defer r.resp.Body.Close()
		checkStream(t, r.resp)
	case <-time.After(10 * time.Second):
		t.Fatal("the second viewer got no answer")
	}
	if got := store.userCalls.Load(); got != 1 {
		t.Errorf("%d User lookups, want 1 shared by both viewers", got)
	}
}

// TestSnapshotShared guards that viewers arriving one after another within
// snapshotMaxAge share one snapshot query and wait for nobody, and that an
// event published after that query began still reaches a later viewer,
// replayed from the window: sharing a snapshot loses nothing.
func TestSnapshotShared(t *testing.T) {
	store := newFakeStore()
	h := newHarness(t, store, nil)
	checkStream(t, h.get(t, "", hs256(t, claimsFor("u-viewer", nil))))
	ev := sse.Event{Topic: "identity.formed", Type: "formed", TS: "1", Payload: json.RawMessage(`{"identity_uuid":"late"}`)}
	if err := h.broker.Publish(ev); err != nil {
		t.Fatal(err)
	}
	resp := h.get(t, "", hs256(t, claimsFor("u-viewer2", nil)))
	checkStream(t, resp)
	br := bufio.NewReader(resp.Body)
	var frame strings.Builder
	for !strings.HasSuffix(frame.String(), "\n\n") {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("read replayed frame: %v (got %q)", err, frame.String())
		}
		frame.WriteString(line)
	}
	if !strings.Contains(frame.String(), `"payload":{"identity_uuid":"late"}`) {
		t.Fatalf("frame after the snapshot %q, want the event published after the shared query", frame.String())
	}
	if got := store.snapshotCalls.Load(); got != 1 {
		t.Errorf("%d snapshot queries for two viewers within %v, want 1", got, snapshotMaxAge)
	}
	time.Sleep(snapshotMaxAge)
	checkStream(t, h.get(t, "", hs256(t, claimsFor("u-admin", nil))))
	if got := store.snapshotCalls.Load(); got != 2 {
		t.Errorf("%d snapshot queries after the shared one aged, want 2", got)
	}
}

// TestStreamRefusedAfterTakeover guards the shutdown race: a viewer that
// passed every check just as Wait began has its taken-over connection closed
// and gives its cap slots back exactly once.
func TestStreamRefusedAfterTakeover(t *testing.T) {
	h := newHarness(t, newFakeStore(), nil)
	if err := h.srv.Wait(context.Background()); err != nil { // no stream open: only closes the set
		t.Fatal(err)
	}
	resp, err := h.client.Do(h.request(t, "", hs256(t, claimsFor("u-viewer", nil))))
	if err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("got %d %q, want the connection closed", resp.StatusCode, body)
	}
	h.waitOpen(t, "u-viewer", 0)
	h.waitReturned(t) // after that no slot can move
	h.srv.limits.mu.Lock()
	total := h.srv.limits.total
	h.srv.limits.mu.Unlock()
	if total != 0 {
		t.Fatalf("%d slots held in all after the refusal, want 0 (a negative count is a double release)", total)
	}
}
