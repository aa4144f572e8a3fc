// Package config holds every setting of the relay: one struct, filled once from
// flags and environment variables, validated once before anything starts.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/decnet/identity-relay/pkg/fanout"
)

// ErrInvalid marks a configuration error; the process exits with code 2.
var ErrInvalid = errors.New("invalid configuration")

// MinSecretLen is the shortest JWT secret accepted outside demo mode.
const MinSecretLen = 32

// Config is the relay's settings. Each field names its variable; a flag of
// the same name (RELAY_LISTEN_ADDR = --listen-addr) overrides the variable.
type Config struct {
	Demo              bool          // --demo / RELAY_DEMO: in-process Kafka, memory store, live page; default false
	ListenAddr        string        // RELAY_LISTEN_ADDR, default ":8080"
	TrustedProxies    []string      // RELAY_TRUSTED_PROXIES, comma list of IPs and CIDRs, default none
	KafkaBrokers      []string      // RELAY_KAFKA_BROKERS, comma list, required
	TopicsRegex       string        // RELAY_KAFKA_TOPICS_REGEX, default `^identity\..+`
	DatabaseURL       string        // RELAY_DATABASE_URL, postgres URL, required
	DatabaseTimeout   time.Duration // RELAY_DATABASE_TIMEOUT, default 1.5s
	JWTSecret         string        // RELAY_JWT_SECRET, at least 32 characters, required
	JWTIssuer         string        // RELAY_JWT_ISSUER, checked only when set
	JWTAudience       string        // RELAY_JWT_AUDIENCE, checked only when set
	JWTLeeway         time.Duration // RELAY_JWT_LEEWAY, default 5s: clock skew allowed on iat and nbf
	MaxPerUser        int           // RELAY_SSE_MAX_PER_USER, default 5
	MaxConnections    int           // RELAY_SSE_MAX_CONNECTIONS, default 10000
	Keepalive         time.Duration // RELAY_SSE_KEEPALIVE, default 15s
	WriteTimeout      time.Duration // RELAY_SSE_WRITE_TIMEOUT, default 10s
	SubscriberBuffer  int           // RELAY_SUBSCRIBER_BUFFER, default 256 frames
	FlushInterval     time.Duration // RELAY_SSE_FLUSH_INTERVAL, default 1ms (idle: at once); 0 writes every event at once
	SendBuffer        int           // RELAY_SSE_SEND_BUFFER, bytes, default 1048576; 0 leaves the kernel's autotuning
	UserTimeout       time.Duration // RELAY_SSE_USER_TIMEOUT, TCP_USER_TIMEOUT of streams, default 30s; 0 leaves the kernel's
	Retry             time.Duration // RELAY_SSE_RETRY, default 3s
	MaxLifetime       time.Duration // RELAY_SSE_MAX_LIFETIME, default 0 (streams live as long as their viewer)
	LifetimeJitter    float64       // RELAY_SSE_LIFETIME_JITTER, fraction of MaxLifetime, default 0.2
	ReplayWindow      int           // RELAY_REPLAY_WINDOW, default 10000 events
	ReplayWindowBytes int           // RELAY_REPLAY_WINDOW_BYTES, default 67108864
	SnapshotLimit     int           // RELAY_SNAPSHOT_LIMIT, default 50
	MaxRecordBytes    int           // RELAY_MAX_RECORD_BYTES, default 1048576
	ShutdownTimeout   time.Duration // RELAY_SHUTDOWN_TIMEOUT, default 25s
	ShutdownSpread    time.Duration // RELAY_SHUTDOWN_SPREAD, default 0 (every stream ends at once); below ShutdownTimeout
	Peers             []string      // RELAY_PEERS, comma list of host:port (a name may resolve to many), default none: no rebalancing
	RebalanceInterval time.Duration // RELAY_REBALANCE_INTERVAL, default 30s
	RebalanceTol      float64       // RELAY_REBALANCE_TOLERANCE, fraction of the average, default 0.1
	LogLevel          slog.Level    // RELAY_LOG_LEVEL: debug, info, warn, error; default info
	LogFormat         string        // RELAY_LOG_FORMAT: json or text; default json
}

type setting struct {
	env, def, help string
	set            func(c *Config, v string) error
}

// Flag is the flag name of the setting: RELAY_SSE_KEEPALIVE → sse-keepalive.
func (s setting) flag() string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(s.env, "RELAY_")), "_", "-")
}

var settings = []setting{
	{"RELAY_DEMO", "false", "run the self-contained demo: in-process Kafka, a publisher, an in-memory store and a live page at /",
		func(c *Config, v string) (err error) { c.Demo, err = strconv.ParseBool(v); return }},
	{"RELAY_LISTEN_ADDR", ":8080", "address the HTTP server listens on",
		func(c *Config, v string) error { c.ListenAddr = v; return nonEmpty(v) }},
	{"RELAY_TRUSTED_PROXIES", "", "comma-separated IPs and CIDRs of the proxies whose X-Forwarded-For gives the logged client address; none when empty",
		func(c *Config, v string) (err error) { c.TrustedProxies, err = ipsOrCIDRs(v); return }},
	{"RELAY_KAFKA_BROKERS", "", "comma-separated Kafka bootstrap brokers, host:port (required)",
		func(c *Config, v string) error { c.KafkaBrokers = splitList(v); return nil }},
	{"RELAY_KAFKA_TOPICS_REGEX", `^identity\..+`, "topics to read; new matching topics are picked up within 10s",
		func(c *Config, v string) error { c.TopicsRegex = v; _, err := regexp.Compile(v); return err }},
	{"RELAY_DATABASE_URL", "", "PostgreSQL URL, postgres://user:pass@host:5432/db?sslmode=... (required)",
		func(c *Config, v string) error { c.DatabaseURL = v; return databaseURL(v) }},
	{"RELAY_DATABASE_TIMEOUT", "1.5s", "limit on each database call of a connect; past it the viewer gets 503",
		func(c *Config, v string) (err error) { c.DatabaseTimeout, err = positiveDuration(v); return }},
	{"RELAY_JWT_SECRET", "", "HS256 secret shared with DECNET, at least 32 characters (required)",
		func(c *Config, v string) error { c.JWTSecret = v; return nil }},
	{"RELAY_JWT_ISSUER", "", "required iss claim; not checked when empty",
		func(c *Config, v string) error { c.JWTIssuer = v; return nil }},
	{"RELAY_JWT_AUDIENCE", "", "required aud claim; not checked when empty",
		func(c *Config, v string) error { c.JWTAudience = v; return nil }},
	{"RELAY_JWT_LEEWAY", "5s", "clock skew allowed between DECNET and the relay on the iat and nbf claims (not on exp); 0 allows none",
		func(c *Config, v string) (err error) { c.JWTLeeway, err = nonNegativeDuration(v); return }},
	{"RELAY_SSE_MAX_PER_USER", "5", "open streams per user; past it 429",
		func(c *Config, v string) (err error) { c.MaxPerUser, err = positiveInt(v); return }},
	{"RELAY_SSE_MAX_CONNECTIONS", "10000", "open streams per replica; past it 503",
		func(c *Config, v string) (err error) { c.MaxConnections, err = positiveInt(v); return }},
	{"RELAY_SSE_KEEPALIVE", "15s", "send a keepalive comment after this long without a frame",
		func(c *Config, v string) (err error) { c.Keepalive, err = positiveDuration(v); return }},
	{"RELAY_SSE_WRITE_TIMEOUT", "10s", "limit on one write to a viewer; a viewer that takes longer is cut",
		func(c *Config, v string) (err error) { c.WriteTimeout, err = positiveDuration(v); return }},
	{"RELAY_SUBSCRIBER_BUFFER", strconv.Itoa(fanout.DefaultBuffer), "frames queued per viewer; a viewer whose queue is full is dropped",
		func(c *Config, v string) (err error) { c.SubscriberBuffer, err = positiveInt(v); return }},
	{"RELAY_SSE_FLUSH_INTERVAL", "1ms", "under load, longest an event waits so that events close together reach a viewer in one write; an event that finds the relay idle goes out at once; 0 writes each at once",
		func(c *Config, v string) (err error) { c.FlushInterval, err = nonNegativeDuration(v); return }},
	{"RELAY_SSE_SEND_BUFFER", "1048576", "kernel send buffer per stream (SO_SNDBUF), bytes: bounds a stalled viewer's kernel memory; 0 leaves it to the kernel (up to tcp_wmem's maximum)",
		func(c *Config, v string) (err error) { c.SendBuffer, err = nonNegativeInt(v); return }},
	{"RELAY_SSE_USER_TIMEOUT", "30s", "TCP_USER_TIMEOUT of streams: a client that stops acknowledging (gone to sleep, off the network) is cut this long after the relay's first unacknowledged write; 0 leaves it to the kernel (about 15 minutes)",
		func(c *Config, v string) (err error) { c.UserTimeout, err = userTimeout(v); return }},
	{"RELAY_SSE_RETRY", "3s", "reconnection delay hinted to browsers with retry: once per stream",
		func(c *Config, v string) (err error) { c.Retry, err = positiveDuration(v); return }},
	{"RELAY_SSE_MAX_LIFETIME", "0", "longest a stream lives: it then ends between frames and the browser resumes with Last-Event-ID, through the load balancer (so viewers spread onto new replicas); 0 never ends it",
		func(c *Config, v string) (err error) { c.MaxLifetime, err = nonNegativeDuration(v); return }},
	{"RELAY_SSE_LIFETIME_JITTER", "0.2", "fraction of RELAY_SSE_MAX_LIFETIME by which each stream's lifetime is shortened at random (uniformly), so that streams opened together do not end together; 0 to 1",
		func(c *Config, v string) (err error) { c.LifetimeJitter, err = fraction(v); return }},
	{"RELAY_REPLAY_WINDOW", strconv.Itoa(fanout.DefaultWindowEvents), "events kept in memory for Last-Event-ID resumes; also read back from Kafka per partition at start-up",
		func(c *Config, v string) (err error) { c.ReplayWindow, err = positiveInt(v); return }},
	{"RELAY_REPLAY_WINDOW_BYTES", strconv.Itoa(fanout.DefaultWindowBytes), "bytes of encoded frames kept for resumes (the window evicts past either bound)",
		func(c *Config, v string) (err error) { c.ReplayWindowBytes, err = positiveInt(v); return }},
	{"RELAY_SNAPSHOT_LIMIT", "50", "identities in the snapshot frame",
		func(c *Config, v string) (err error) { c.SnapshotLimit, err = positiveInt(v); return }},
	{"RELAY_MAX_RECORD_BYTES", "1048576", "largest Kafka record value relayed; larger ones are skipped and counted",
		func(c *Config, v string) (err error) { c.MaxRecordBytes, err = positiveInt(v); return }},
	{"RELAY_SHUTDOWN_TIMEOUT", "25s", "on SIGTERM, end every stream and exit within this",
		func(c *Config, v string) (err error) { c.ShutdownTimeout, err = positiveDuration(v); return }},
	{"RELAY_SHUTDOWN_SPREAD", "0", "on SIGTERM, end the open streams one by one spread evenly over this window (in a random order) instead of all at once, so their reconnects are spread too; below RELAY_SHUTDOWN_TIMEOUT",
		func(c *Config, v string) (err error) { c.ShutdownSpread, err = nonNegativeDuration(v); return }},
	{"RELAY_PEERS", "", "comma-separated host:port of the relay's replicas (one name, such as a headless Service's, may resolve to many; re-resolved every round): each replica asks the others for their open-stream counts every RELAY_REBALANCE_INTERVAL and ends streams it holds above the average, which resume elsewhere with Last-Event-ID; none when empty (no rebalancing)",
		func(c *Config, v string) (err error) { c.Peers, err = hostPorts(v); return }},
	{"RELAY_REBALANCE_INTERVAL", "30s", "how often a replica with RELAY_PEERS compares its open streams with its peers'; the streams it ends are spread over the first half of the interval, the second half lets their viewers land before the next count; at least 1s",
		func(c *Config, v string) (err error) { c.RebalanceInterval, err = atLeastSecond(v); return }},
	{"RELAY_REBALANCE_TOLERANCE", "0.1", "a replica ends streams when it holds more than the average × (1 + this), or when a peer holds fewer than the average × (1 − this) and it holds more than the average; it then ends those above the average (rounded up); 0 to 1",
		func(c *Config, v string) (err error) { c.RebalanceTol, err = fraction(v); return }},
	{"RELAY_LOG_LEVEL", "info", "debug, info, warn or error",
		func(c *Config, v string) error { return c.LogLevel.UnmarshalText([]byte(v)) }},
	{"RELAY_LOG_FORMAT", "json", "json or text",
		func(c *Config, v string) error {
			c.LogFormat = v
			if v != "json" && v != "text" {
				return errors.New("want json or text")
			}
			return nil
		}},
}

// Load fills a Config from args (without the program name) and getenv, flags
// winning over variables, and validates it. It returns flag.ErrHelp after
// printing the settings when asked for -h or --help.
func Load(args []string, getenv func(string) string, out io.Writer) (*Config, error) {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	values := make([]string, len(settings))
	for i, s := range settings {
		values[i] = s.def
		if v := getenv(s.env); v != "" {
			values[i] = v
		}
		if s.env == "RELAY_DEMO" {
			fs.BoolFunc(s.flag(), s.help, func(v string) error { values[i] = v; return nil })
			continue
		}
		fs.Func(s.flag(), s.help, func(v string) error { values[i] = v; return nil })
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			Usage(out)
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%w: unexpected argument %q", ErrInvalid, fs.Arg(0))
	}
	c := &Config{}
	for i, s := range settings {
		if err := s.set(c, values[i]); err != nil {
			return nil, fmt.Errorf("%w: %s (--%s): %q: %v", ErrInvalid, s.env, s.flag(), redact(s.env, values[i]), err)
		}
	}
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return c, nil
}

// validate checks what spans settings. Demo mode supplies its own Kafka,
// store and secret.
func (c *Config) validate() error {
	if c.ShutdownSpread >= c.ShutdownTimeout {
		// The streams still open at the timeout are cut, not ended cleanly.
		return fmt.Errorf("RELAY_SHUTDOWN_SPREAD (%v) must be below RELAY_SHUTDOWN_TIMEOUT (%v)", c.ShutdownSpread, c.ShutdownTimeout)
	}
	if c.Demo {
		return nil
	}
	var missing []string
	if len(c.KafkaBrokers) == 0 {
		missing = append(missing, "RELAY_KAFKA_BROKERS")
	}
	if c.DatabaseURL == "" {
		missing = append(missing, "RELAY_DATABASE_URL")
	}
	if c.JWTSecret == "" {
		missing = append(missing, "RELAY_JWT_SECRET")
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s not set: set them, or run with --demo", strings.Join(missing, ", "))
	}
	if len(c.JWTSecret) < MinSecretLen {
		return fmt.Errorf("RELAY_JWT_SECRET: must be at least %d characters, got %d", MinSecretLen, len(c.JWTSecret))
	}
	return nil
}

// Usage prints every setting with its variable, flag and default.
func Usage(out io.Writer) {
	fmt.Fprintln(out, "Usage: relay [flags]\n\nEvery setting is an environment variable and the same-named flag; the flag wins.")
	for _, s := range settings {
		def := s.def
		if def == "" {
			def = "none"
		}
		fmt.Fprintf(out, "\n  %s, --%s (default %s)\n      %s\n", s.env, s.flag(), def, s.help)
	}
}

// redact keeps credentials out of error messages.
func redact(env, v string) string {
	if env == "RELAY_JWT_SECRET" || env == "RELAY_DATABASE_URL" {
		return "<redacted>"
	}
	return v
}

func splitList(v string) []string {
	var out []string
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// databaseURL checks v as lib/pq will parse it. url.Parse's error quotes
// the URL, and its reason can hold a part of the password (a '/' in it
// ends the host): neither is passed on.
func databaseURL(v string) error {
	if v == "" {
		return nil // required: validate says so
	}
	if u, err := url.Parse(v); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return errors.New("want a URL such as postgres://user:pass@host:5432/db?sslmode=require")
	}
	return nil
}

// userTimeout is 0 or at least a second: less would cut healthy clients
// whose acknowledgements are merely late.
func userTimeout(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 || (d > 0 && d < time.Second) {
		return 0, errors.New("want 0 or a duration of at least 1s")
	}
	return d, nil
}

// ipsOrCIDRs splits a comma list of IP addresses and CIDRs, as Gin's
// SetTrustedProxies takes them.
func ipsOrCIDRs(v string) ([]string, error) {
	list := splitList(v)
	for _, p := range list {
		if a, err := netip.ParseAddr(p); err == nil && a.Zone() == "" {
			continue
		}
		if _, err := netip.ParsePrefix(p); err != nil {
			return nil, fmt.Errorf("%q is not an IP address or CIDR", p)
		}
	}
	return list, nil
}

// hostPorts splits a comma list of host:port, the port a number.
func hostPorts(v string) ([]string, error) {
	list := splitList(v)
	for _, p := range list {
		host, port, err := net.SplitHostPort(p)
		if _, perr := strconv.ParseUint(port, 10, 16); err != nil || host == "" || perr != nil {
			return nil, fmt.Errorf("%q is not host:port", p)
		}
	}
	return list, nil
}

// atLeastSecond is a duration of 1s or more.
func atLeastSecond(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d < time.Second {
		return 0, errors.New("want a duration of at least 1s, such as 30s")
	}
	return d, nil
}

// fraction is a number from 0 to 1.
func fraction(v string) (float64, error) {
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || !(f >= 0 && f <= 1) {
		return 0, errors.New("want a number from 0 to 1, such as 0.2")
	}
	return f, nil
}

func nonEmpty(v string) error {
	if v == "" {
		return errors.New("must not be empty")
	}
	return nil
}

func positiveInt(v string) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, errors.New("want a positive integer")
	}
	return n, nil
}

func nonNegativeInt(v string) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, errors.New("want a non-negative integer")
	}
	return n, nil
}

func nonNegativeDuration(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, errors.New("want a duration such as 5ms, or 0")
	}
	return d, nil
}

func positiveDuration(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, errors.New("want a positive duration such as 15s")
	}
	return d, nil
}
