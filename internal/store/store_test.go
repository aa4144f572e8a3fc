package store_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/store"
	"github.com/decnet/identity-relay/internal/testenv"
)

func open(t *testing.T) *store.Postgres {
	t.Helper()
	pg, err := store.Open(testenv.DatabaseURL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Close() })
	return pg
}

// The snapshot holds the newest 50 unmerged rows, ordered by updated_at
// descending then uuid ascending, each encoded as CONTRACT.md says.
func TestSnapshotAgainstPostgres(t *testing.T) {
	pg, db := open(t), relaytest.DB(t)
	if _, err := db.Exec(`TRUNCATE attacker_identities`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(`TRUNCATE attacker_identities`) })
	base := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	// 60 live rows, two sharing each updated_at so the uuid tie-break matters,
	// and 5 merged rows newer than all of them, which must not appear.
	for i := range 60 {
		_, err := db.Exec(`INSERT INTO attacker_identities (uuid, created_at, updated_at) VALUES ($1, $2, $2)`,
			fmt.Sprintf("id-%03d", i), base.Add(time.Duration(i/2)*time.Second))
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		_, err := db.Exec(`INSERT INTO attacker_identities (uuid, created_at, updated_at, merged_into_uuid) VALUES ($1, $2, $2, 'id-000')`,
			fmt.Sprintf("merged-%d", i), base.Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
	}
	raw, err := pg.Snapshot(context.Background(), 50)
	if err != nil {
		t.Fatal(err)
	}
	var rows []map[string]any
	if err := json.Unmarshal(raw, &rows); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 50 {
		t.Fatalf("%d rows, want 50", len(rows))
	}
	// Newest pair is id-058/id-059 (same second): uuid ascending within it.
	for i, row := range rows {
		pair := 29 - i/2
		want := fmt.Sprintf("id-%03d", pair*2+i%2)
		if row["uuid"] != want {
			t.Fatalf("row %d is %v, want %s", i, row["uuid"], want)
		}
		if len(row) != 21 {
			t.Fatalf("row %d has %d columns, want all 21", i, len(row))
		}
	}
}

// One full row encodes exactly: ISO-8601 timestamps with an offset (microseconds
// only when present), JSON-as-text columns as the stored strings, bytea as hex, nulls as null.
func TestIdentityEncoding(t *testing.T) {
	pg, db := open(t), relaytest.DB(t)
	if _, err := db.Exec(`TRUNCATE attacker_identities`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(`TRUNCATE attacker_identities`) })
	_, err := db.Exec(`INSERT INTO attacker_identities VALUES (
		'u-1', 2, 'camp-1', '2026-01-02T03:04:05.123456Z', NULL, '2026-01-02T03:04:05Z', '2026-01-02T05:04:05.5+02:00',
		0.875, 7, '["ja3a","ja3b"]', '[]', '[]', '[]', '["HTTP/2"]', '[]', '[]', '[]', '[{"host":"c2.example","port":443}]',
		'\xdeadBEEF', NULL, 'a "note"')`)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := pg.Snapshot(context.Background(), 50)
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"uuid":"u-1","schema_version":2,"campaign_id":"camp-1","first_seen_at":"2026-01-02T03:04:05.123456+00:00",` +
		`"last_seen_at":null,"created_at":"2026-01-02T03:04:05+00:00","updated_at":"2026-01-02T03:04:05.500000+00:00",` +
		`"confidence":0.875,"observation_count":7,"ja3_hashes":"[\"ja3a\",\"ja3b\"]","hassh_hashes":"[]","ja4h_hashes":"[]",` +
		`"ja4_quic_hashes":"[]","http_versions_seen":"[\"HTTP/2\"]","tls_cert_sha256":"[]","ipv6_link_local_iids":"[]",` +
		`"payload_simhashes":"[]","c2_endpoints":"[{\"host\":\"c2.example\",\"port\":443}]","kd_digraph_simhash":"deadbeef",` +
		`"merged_into_uuid":null,"notes":"a \"note\""}]`
	if string(raw) != want {
		t.Fatalf("snapshot\n got %s\nwant %s", raw, want)
	}
	if _, err := db.Exec(`UPDATE attacker_identities SET kd_digraph_simhash = NULL`); err != nil {
		t.Fatal(err)
	}
	raw, err = pg.Snapshot(context.Background(), 50)
	if err != nil {
		t.Fatal(err)
	}
	var rows []map[string]any
	if err := json.Unmarshal(raw, &rows); err != nil || rows[0]["kd_digraph_simhash"] != nil {
		t.Fatalf("null simhash: %v %s", err, raw)
	}
}

// Users and revocations are read as stored; an unknown user is nil, not an error.
func TestUsersAndRevocations(t *testing.T) {
	pg, db := open(t), relaytest.DB(t)
	ctx := context.Background()
	viewer := relaytest.AddUser(t, db, "viewer")
	cutoff := time.Date(2026, 5, 6, 7, 8, 9, 750000000, time.UTC)
	if _, err := db.Exec(`UPDATE users SET must_change_password = true, tokens_valid_from = $2 WHERE uuid = $1`, viewer, cutoff); err != nil {
		t.Fatal(err)
	}
	u, err := pg.User(ctx, viewer)
	if err != nil || u == nil {
		t.Fatalf("user: %v %v", u, err)
	}
	if u.UUID != viewer || u.Role != "viewer" || !u.MustChangePassword || u.TokensValidFrom == nil || !u.TokensValidFrom.Equal(cutoff) {
		t.Fatalf("user %+v", u)
	}
	if u, err := pg.User(ctx, "no-such-user"); u != nil || err != nil {
		t.Fatalf("unknown user: %v %v", u, err)
	}
	jti := relaytest.RandomID(8)
	if r, err := pg.Revoked(ctx, jti); r || err != nil {
		t.Fatalf("fresh jti revoked=%v err=%v", r, err)
	}
	if _, err := db.Exec(`INSERT INTO revoked_tokens (jti) VALUES ($1)`, jti); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(`DELETE FROM revoked_tokens WHERE jti = $1`, jti) })
	if r, err := pg.Revoked(ctx, jti); !r || err != nil {
		t.Fatalf("revoked jti revoked=%v err=%v", r, err)
	}
	if err := pg.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestErrorsHideCredentials guards that no error of the store, which the
// relay logs, holds the database password: lib/pq quotes the whole URL in
// the error when it cannot use it, on every call.
func TestErrorsHideCredentials(t *testing.T) {
	tests := []struct {
		name, url string
		secrets   []string
	}{
		{"port not a number", "postgres://relay:s3cr3t-pw@db:port/decnet", []string{"s3cr3t-pw"}},
		{"slash in the password", "postgres://relay:s3cr3t/pw@db/decnet", []string{"s3cr3t"}},
		{"escaped characters in the password", `postgres://relay:s3cr%40t"pw@db:port/decnet`, []string{"s3cr%40t", `s3cr@t"pw`, `s3cr%40t\"pw`}},
		{"not a URL", "host=db user=relay password=s3cr3t-kv dbname=decnet port=x", []string{"s3cr3t-kv"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pg, err := store.Open(tt.url)
			if err != nil {
				t.Fatal(err)
			}
			defer pg.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, userErr := pg.User(ctx, "u")
			_, revokedErr := pg.Revoked(ctx, "j")
			_, snapErr := pg.Snapshot(ctx, 1)
			for name, err := range map[string]error{"User": userErr, "Revoked": revokedErr, "Snapshot": snapErr, "Ping": pg.Ping(ctx)} {
				if err == nil {
					t.Fatalf("%s: no error", name)
				}
				for _, s := range tt.secrets {
					if strings.Contains(err.Error(), s) {
						t.Errorf("%s: error %q holds the password", name, err)
					}
				}
			}
		})
	}
}
