package main

import (
	"net/http"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/decnet/identity-relay/internal/relaytest"
)

// TestStreamEndsWithItsCredential guards, against the real relay and
// PostgreSQL with the production 10 s lookup cache, that an open stream ends
// cleanly between frames when its token expires, and after its jti is
// revoked or its user's tokens_valid_from moves past its iat; each end is
// counted as reason "credential" and each reconnect gets 401.
func TestStreamEndsWithItsCredential(t *testing.T) {
	env, topic := relaytest.TopicEnv(t, nil)
	r, _ := relaytest.StartOnTopic(t, env, topic, 1)
	db := relaytest.DB(t)
	tests := []struct {
		name   string
		exp    time.Duration
		change func(t *testing.T, db *sqlx.DB, user, jti string)
	}{
		{name: "token expires in 2 s", exp: 2 * time.Second},
		{name: "jti revoked", exp: time.Hour, change: func(t *testing.T, db *sqlx.DB, _, jti string) {
			mustExec(t, db, `INSERT INTO revoked_tokens (jti) VALUES ($1)`, jti)
			t.Cleanup(func() { _, _ = db.Exec(`DELETE FROM revoked_tokens WHERE jti = $1`, jti) })
		}},
		{name: "tokens_valid_from moved past iat", exp: time.Hour, change: func(t *testing.T, db *sqlx.DB, user, _ string) {
			mustExec(t, db, `UPDATE users SET tokens_valid_from = now() + interval '1 second' WHERE uuid = $1`, user)
		}},
	}
	// All streams at once: each may wait up to the 10 s cache.
	tokens := make([]string, len(tests))
	viewers := make([]*sseViewer, len(tests))
	changed := make([]time.Time, len(tests)) // when the credential became invalid
	for i, tt := range tests {
		user, jti := relaytest.AddUser(t, db, "viewer"), relaytest.RandomID(8)
		exp := time.Now().Add(tt.exp).Truncate(time.Second) // exp is whole seconds
		tokens[i] = relaytest.TokenUntil(t, relaytest.Secret, user, jti, exp)
		viewers[i] = openViewer(t, streamClient(t), r.URL, tokens[i])
		expectStarted(t, viewers[i:i+1], 30*time.Second)
		changed[i] = exp
		if tt.change != nil {
			tt.change(t, db, user, jti)
			changed[i] = time.Now()
		}
	}
	for i, tt := range tests {
		select {
		case <-viewers[i].done:
		case <-time.After(60 * time.Second): // bounds a hang only
			t.Fatalf("%s: the stream did not end", tt.name)
		}
		if _, err := viewers[i].ended(); err != nil {
			t.Fatalf("%s: the stream was cut, not ended between frames: %v", tt.name, err)
		}
		t.Logf("%s: stream ended %v after the credential became invalid", tt.name, time.Since(changed[i]).Round(time.Millisecond))
	}
	waitMetricAtLeast(t, r.URL, `relay_viewer_disconnects_total{reason="credential"}`, float64(len(tests)), 10*time.Second)
	for i, tt := range tests {
		if code, body, _ := timedConnect(t, r.URL, tokens[i]); code != http.StatusUnauthorized || body != `{"detail":"Could not validate credentials"}` {
			t.Errorf("%s: reconnect got %d %s, want 401", tt.name, code, body)
		}
	}
	if n := relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="credential"}`); n != float64(len(tests)) {
		t.Errorf("%v streams ended for their credential, want %d", n, len(tests))
	}
}

func mustExec(t *testing.T, db *sqlx.DB, query string, args ...any) {
	t.Helper()
	if _, err := db.Exec(query, args...); err != nil {
		t.Fatal(err)
	}
}
