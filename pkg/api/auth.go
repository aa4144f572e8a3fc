package api

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// MaxTokenBytes bounds the credential the relay will parse; longer is a 401.
const MaxTokenBytes = 8 << 10

// User is the row of the users table that authorization needs.
type User struct {
	UUID               string
	Username           string
	Role               string
	MustChangePassword bool
	TokensValidFrom    *time.Time
}

// tokenFrom returns the credential: the Authorization header when it has the
// exact "Bearer " prefix, else the token query parameter (EventSource cannot
// set headers). An Authorization header of any other form is ignored.
func tokenFrom(header, query string) string {
	if tok, ok := strings.CutPrefix(header, "Bearer "); ok && tok != "" {
		return tok
	}
	return query
}

// claims are the JWT claims the relay reads; uuid names the user, sub is unused.
type claims struct {
	UUID string `json:"uuid"`
	jwt.RegisteredClaims
}

// verifier checks HS256 tokens. Every other algorithm, alg:none included, is refused.
type verifier struct {
	secret []byte
	parser *jwt.Parser
}

func newVerifier(secret []byte, issuer, audience string) *verifier {
	opts := []jwt.ParserOption{
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	}
	if issuer != "" {
		opts = append(opts, jwt.WithIssuer(issuer))
	}
	if audience != "" {
		opts = append(opts, jwt.WithAudience(audience))
	}
	return &verifier{secret: secret, parser: jwt.NewParser(opts...)}
}

var errBadToken = errors.New("invalid token")

// verify returns the claims of a valid token. The error never holds the token.
func (v *verifier) verify(token string) (*claims, error) {
	if token == "" || len(token) > MaxTokenBytes {
		return nil, errBadToken
	}
	var c claims
	_, err := v.parser.ParseWithClaims(token, &c, func(*jwt.Token) (any, error) { return v.secret, nil })
	if err != nil {
		return nil, errBadToken
	}
	if c.UUID == "" || c.ID == "" {
		return nil, errBadToken
	}
	return &c, nil
}

// issuedBeforeCutoff applies CONTRACT.md: iat < floor(tokens_valid_from) in
// epoch seconds is refused, and so is a token without iat when the user has a
// cut-off.
func issuedBeforeCutoff(c *claims, u *User) bool {
	if u.TokensValidFrom == nil {
		return false
	}
	if c.IssuedAt == nil {
		return true
	}
	cutoff := math.Floor(float64(u.TokensValidFrom.UnixNano()) / 1e9)
	return float64(c.IssuedAt.Unix()) < cutoff
}

// cachedStore keeps user rows and revocations for ttl so that a reconnect
// storm costs a handful of queries, not one per viewer. Errors are not cached.
type cachedStore struct {
	Store
	ttl time.Duration

	mu      sync.Mutex
	users   map[string]cached[*User]
	revoked map[string]cached[bool]
}

type cached[T any] struct {
	v       T
	expires time.Time
}

func newCachedStore(s Store, ttl time.Duration) *cachedStore {
	return &cachedStore{Store: s, ttl: ttl, users: map[string]cached[*User]{}, revoked: map[string]cached[bool]{}}
}

func (c *cachedStore) User(ctx context.Context, uuid string) (*User, error) {
	return lookup(c, c.users, uuid, func() (*User, error) { return c.Store.User(ctx, uuid) })
}

func (c *cachedStore) Revoked(ctx context.Context, jti string) (bool, error) {
	return lookup(c, c.revoked, jti, func() (bool, error) { return c.Store.Revoked(ctx, jti) })
}

// maxCached bounds each cache; past it, expired entries are swept.
const maxCached = 100_000

func lookup[T any](c *cachedStore, m map[string]cached[T], key string, load func() (T, error)) (T, error) {
	now := time.Now()
	c.mu.Lock()
	e, ok := m[key]
	c.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e.v, nil
	}
	v, err := load()
	if err != nil || c.ttl <= 0 {
		return v, err
	}
	c.mu.Lock()
	if len(m) >= maxCached {
		for k, e := range m {
			if !now.Before(e.expires) {
				delete(m, k)
			}
		}
		if len(m) >= maxCached {
			clear(m)
		}
	}
	m[key] = cached[T]{v: v, expires: now.Add(c.ttl)}
	c.mu.Unlock()
	return v, nil
}
