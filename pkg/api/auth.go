package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/decnet/identity-relay/internal/users"
)

// MaxTokenBytes bounds the credential the relay will parse; longer is a 401.
const MaxTokenBytes = 8 << 10

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

// newVerifier allows leeway of clock skew on iat and nbf: a DECNET clock a
// second ahead must not make fresh tokens 401. Not on exp, which the parser
// would also stretch: the token's lifetime is DECNET's decision, and a
// stream ends at exp (viewer.go), so verify checks exp without it.
func newVerifier(secret []byte, issuer, audience string, leeway time.Duration) *verifier {
	opts := []jwt.ParserOption{
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(leeway),
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
	if c.UUID == "" || c.ID == "" || !time.Now().Before(c.ExpiresAt.Time) {
		return nil, errBadToken
	}
	return &c, nil
}

// issuedBeforeCutoff applies CONTRACT.md: iat < floor(tokens_valid_from) in
// epoch seconds is refused, and so is a token without iat when the user has a
// cut-off. No clock-skew leeway here: both times are DECNET's, and leeway
// would let tokens issued just before a "log out everywhere" through.
func issuedBeforeCutoff(c *claims, u *users.User) bool {
	if u.TokensValidFrom == nil {
		return false
	}
	if c.IssuedAt == nil {
		return true
	}
	// Time.Unix is the floor in seconds, exactly. Float epoch nanoseconds
	// were not: within 128 ns of the next second they rounded up to it.
	return c.IssuedAt.Unix() < u.TokensValidFrom.Unix()
}

// check applies CONTRACT.md's database checks to verified claims, in its
// order: user, cut-off, revocation, must_change_password, role. It returns
// the status and body to refuse with (code 0: allowed) and when the cached
// lookups it used expire, before which a check learns nothing new (zero
// when they were not cached). An error is a failed lookup: the database's
// fault, not the credential's.
func (s *Server) check(ctx context.Context, cl *claims) (code int, body []byte, until time.Time, err error) {
	u, until, err := s.store.User(ctx, cl.UUID)
	if err != nil {
		return 0, nil, time.Time{}, fmt.Errorf("user lookup: %w", err)
	}
	if u == nil || issuedBeforeCutoff(cl, u) {
		return http.StatusUnauthorized, bodyUnauthorized, until, nil
	}
	revoked, revokedUntil, err := s.store.Revoked(ctx, cl.ID)
	if err != nil {
		return 0, nil, time.Time{}, fmt.Errorf("revocation lookup: %w", err)
	}
	if revokedUntil.Before(until) {
		until = revokedUntil
	}
	switch {
	case revoked:
		return http.StatusUnauthorized, bodyUnauthorized, until, nil
	case u.MustChangePassword:
		return http.StatusForbidden, bodyMustChange, until, nil
	case u.Role != "viewer" && u.Role != "admin":
		return http.StatusForbidden, bodyForbidden, until, nil
	}
	return 0, nil, until, nil
}

// cachedStore keeps user rows and revocations for ttl, and lets concurrent
// lookups of one key share one query, so a reconnect storm costs a handful
// of queries, not one per viewer, and so do the re-checks of open streams.
// Errors are not cached. User and Revoked also return when the value leaves
// the cache (zero when it was not cached). Ping is shared too (pingEvery).
type cachedStore struct {
	Store
	users   *ttlCache[*users.User]
	revoked *ttlCache[bool]
	pings   *ttlCache[error]
}

// pingEvery bounds the database pings behind /readyz and /peerz, which
// answer anyone without a credential: however many ask, and whether the
// database answers or not, the relay pings it at most once per pingEvery.
// A change of the database's state shows in readiness this much later.
const pingEvery = time.Second

func newCachedStore(s Store, ttl, timeout time.Duration) *cachedStore {
	return &cachedStore{
		Store:   s,
		users:   newTTLCache[*users.User](ttl, timeout),
		revoked: newTTLCache[bool](ttl, timeout),
		pings:   newTTLCache[error](pingEvery, timeout),
	}
}

// Ping keeps a failed ping as well as a good one (as the cached value, not
// as the cache's error), or an outage would cost a ping per request.
func (c *cachedStore) Ping(ctx context.Context) error {
	pingErr, _, err := c.pings.get(ctx, "", false, func(ctx context.Context) (error, error) { return c.Store.Ping(ctx), nil })
	if err != nil {
		return err
	}
	return pingErr
}

func (c *cachedStore) User(ctx context.Context, uuid string) (*users.User, time.Time, error) {
	return c.users.get(ctx, uuid, false, func(ctx context.Context) (*users.User, error) { return c.Store.User(ctx, uuid) })
}

func (c *cachedStore) Revoked(ctx context.Context, jti string) (bool, time.Time, error) {
	return c.revoked.get(ctx, jti, false, func(ctx context.Context) (bool, error) { return c.Store.Revoked(ctx, jti) })
}
