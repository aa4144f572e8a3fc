// Package store reads the relay's three tables from PostgreSQL with sqlx. The
// relay never writes them.
package store

import (
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // registers the "postgres" driver

	"github.com/decnet/identity-relay/internal/users"
)

// errBadURL stands for lib/pq's error on a URL it cannot parse, which quotes
// the URL, password included, and parts of it in the reason. The relay
// checks RELAY_DATABASE_URL at start-up, so this is a backstop.
var errBadURL = errors.New("the database URL cannot be parsed (password and details withheld)")

// redact keeps the database password out of err: the relay logs it.
func redact(err error) error {
	if _, ok := errors.AsType[*url.Error](err); ok {
		return errBadURL
	}
	return err
}

// Postgres implements api.Store.
type Postgres struct {
	db *sqlx.DB
}

// The pool's bounds. Lookups are shared and cached (api's ttlCache), so a
// replica needs few connections even in a reconnect storm: 16 at most
// bounds what one replica asks of DECNET's database, 4 idle keep a steady
// trickle of lookups from reconnecting. Connections are recycled so that a
// database restart or failover leaves no stale ones for long.
const (
	maxOpenConns    = 16
	maxIdleConns    = 4
	connMaxIdleTime = 30 * time.Second
	connMaxLifetime = 10 * time.Minute
)

// Open prepares a pool; it does not connect, so the relay starts (and serves
// 503s) while the database is down and recovers without a restart.
func Open(url string) (*Postgres, error) {
	db, err := sqlx.Open("postgres", url)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	db.SetMaxOpenConns(maxOpenConns)
	db.SetMaxIdleConns(maxIdleConns)
	db.SetConnMaxIdleTime(connMaxIdleTime)
	db.SetConnMaxLifetime(connMaxLifetime)
	return &Postgres{db: db}, nil
}

// Close closes the pool.
func (p *Postgres) Close() error { return p.db.Close() }

// Ping reports whether the database answers.
func (p *Postgres) Ping(ctx context.Context) error { return redact(p.db.PingContext(ctx)) }

type userRow struct {
	UUID               string       `db:"uuid"`
	Username           string       `db:"username"`
	Role               string       `db:"role"`
	MustChangePassword bool         `db:"must_change_password"`
	TokensValidFrom    sql.NullTime `db:"tokens_valid_from"`
}

// User returns the user, or nil when there is no such row.
func (p *Postgres) User(ctx context.Context, uuid string) (*users.User, error) {
	var r userRow
	err := p.db.GetContext(ctx, &r,
		`SELECT uuid, username, role, must_change_password, tokens_valid_from FROM users WHERE uuid = $1`, uuid)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("user: %w", redact(err))
	}
	u := &users.User{UUID: r.UUID, Username: r.Username, Role: r.Role, MustChangePassword: r.MustChangePassword}
	if r.TokensValidFrom.Valid {
		t := r.TokensValidFrom.Time
		u.TokensValidFrom = &t
	}
	return u, nil
}

// Revoked reports whether jti is in revoked_tokens.
func (p *Postgres) Revoked(ctx context.Context, jti string) (bool, error) {
	var n int
	err := p.db.GetContext(ctx, &n, `SELECT count(*) FROM revoked_tokens WHERE jti = $1`, jti)
	if err != nil {
		return false, fmt.Errorf("revoked: %w", redact(err))
	}
	return n > 0, nil
}

const snapshotQuery = `
SELECT uuid, schema_version, campaign_id, first_seen_at, last_seen_at, created_at, updated_at,
       confidence, observation_count, ja3_hashes, hassh_hashes, ja4h_hashes, ja4_quic_hashes,
       http_versions_seen, tls_cert_sha256, ipv6_link_local_iids, payload_simhashes, c2_endpoints,
       kd_digraph_simhash, merged_into_uuid, notes
FROM attacker_identities
WHERE merged_into_uuid IS NULL
ORDER BY updated_at DESC, uuid ASC
LIMIT $1`

// Snapshot returns the newest limit unmerged identities as a JSON array.
func (p *Postgres) Snapshot(ctx context.Context, limit int) (json.RawMessage, error) {
	rows := make([]Identity, 0, limit)
	if err := p.db.SelectContext(ctx, &rows, snapshotQuery, limit); err != nil {
		return nil, fmt.Errorf("snapshot: %w", redact(err))
	}
	return json.Marshal(rows)
}

// Identity is one row of attacker_identities, encoded the way the original
// handler encoded it: every column, timestamps as ISO-8601 with an offset,
// the JSON-as-text columns as the stored strings, the simhash as hex.
type Identity struct {
	UUID              string   `db:"uuid" json:"uuid"`
	SchemaVersion     int      `db:"schema_version" json:"schema_version"`
	CampaignID        *string  `db:"campaign_id" json:"campaign_id"`
	FirstSeenAt       *Time    `db:"first_seen_at" json:"first_seen_at"`
	LastSeenAt        *Time    `db:"last_seen_at" json:"last_seen_at"`
	CreatedAt         Time     `db:"created_at" json:"created_at"`
	UpdatedAt         Time     `db:"updated_at" json:"updated_at"`
	Confidence        *float64 `db:"confidence" json:"confidence"`
	ObservationCount  int      `db:"observation_count" json:"observation_count"`
	JA3Hashes         string   `db:"ja3_hashes" json:"ja3_hashes"`
	HASSHHashes       string   `db:"hassh_hashes" json:"hassh_hashes"`
	JA4HHashes        string   `db:"ja4h_hashes" json:"ja4h_hashes"`
	JA4QUICHashes     string   `db:"ja4_quic_hashes" json:"ja4_quic_hashes"`
	HTTPVersionsSeen  string   `db:"http_versions_seen" json:"http_versions_seen"`
	TLSCertSHA256     string   `db:"tls_cert_sha256" json:"tls_cert_sha256"`
	IPv6LinkLocalIIDs string   `db:"ipv6_link_local_iids" json:"ipv6_link_local_iids"`
	PayloadSimhashes  string   `db:"payload_simhashes" json:"payload_simhashes"`
	C2Endpoints       string   `db:"c2_endpoints" json:"c2_endpoints"`
	KDDigraphSimhash  HexBytes `db:"kd_digraph_simhash" json:"kd_digraph_simhash"`
	MergedIntoUUID    *string  `db:"merged_into_uuid" json:"merged_into_uuid"`
	Notes             *string  `db:"notes" json:"notes"`
}

// Time is a timestamptz that encodes as Python's datetime.isoformat() of an
// aware UTC datetime: 2026-01-02T03:04:05.123456+00:00, microseconds only
// when not zero.
type Time struct{ time.Time }

// Scan implements sql.Scanner.
func (t *Time) Scan(src any) error {
	v, ok := src.(time.Time)
	if !ok {
		return fmt.Errorf("store: timestamp column holds %T", src)
	}
	t.Time = v
	return nil
}

// MarshalJSON implements json.Marshaler.
func (t Time) MarshalJSON() ([]byte, error) {
	u := t.UTC()
	layout := `"2006-01-02T15:04:05-07:00"`
	if u.Nanosecond()/1000 != 0 {
		layout = `"2006-01-02T15:04:05.000000-07:00"`
	}
	return []byte(u.Format(layout)), nil
}

// HexBytes is a bytea column that encodes as lowercase hex, or null.
type HexBytes []byte

// Scan implements sql.Scanner.
func (h *HexBytes) Scan(src any) error {
	switch v := src.(type) {
	case nil:
		*h = nil
	case []byte:
		*h = append(HexBytes(nil), v...)
	default:
		return fmt.Errorf("store: bytea column holds %T", src)
	}
	return nil
}

// MarshalJSON implements json.Marshaler.
func (h HexBytes) MarshalJSON() ([]byte, error) {
	if h == nil {
		return []byte("null"), nil
	}
	return json.Marshal(hex.EncodeToString(h))
}
