package config

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

var valid = map[string]string{
	"RELAY_KAFKA_BROKERS": "k1:9092, k2:9092",
	"RELAY_DATABASE_URL":  "postgres://relay:pw@db/decnet",
	"RELAY_JWT_SECRET":    strings.Repeat("s", 32),
}

func with(extra map[string]string) map[string]string {
	m := map[string]string{}
	for k, v := range valid {
		m[k] = v
	}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

// Defaults are the documented ones, and flags win over variables.
func TestDefaultsAndPrecedence(t *testing.T) {
	c, err := Load(nil, env(valid), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.ListenAddr != ":8080" || c.TopicsRegex != `^identity\..+` || c.MaxPerUser != 5 || c.Keepalive != 15*time.Second ||
		c.SubscriberBuffer != 256 || c.SnapshotLimit != 50 || c.ShutdownTimeout != 25*time.Second || c.LogFormat != "json" ||
		c.Retry != 3*time.Second || c.ReplayWindow != 10000 || len(c.KafkaBrokers) != 2 || c.KafkaBrokers[1] != "k2:9092" ||
		c.FlushInterval != time.Millisecond || c.SendBuffer != 1<<20 || c.JWTLeeway != 5*time.Second ||
		c.UserTimeout != 30*time.Second || c.TrustedProxies != nil || c.MaxLifetime != 0 || c.LifetimeJitter != 0.2 ||
		c.ShutdownSpread != 0 || c.Peers != nil || c.RebalanceInterval != 30*time.Second || c.RebalanceTol != 0.1 {
		t.Fatalf("defaults: %+v", c)
	}
	c, err = Load([]string{"--sse-max-per-user", "9", "--listen-addr=:9000"}, env(with(map[string]string{"RELAY_SSE_MAX_PER_USER": "3"})), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxPerUser != 9 || c.ListenAddr != ":9000" {
		t.Fatalf("flags did not win: %+v", c)
	}
}

// A missing or bad setting is one error naming the variable, and never echoes a credential.
func TestInvalidSettings(t *testing.T) {
	cases := []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"nothing set", map[string]string{}, nil, "RELAY_KAFKA_BROKERS, RELAY_DATABASE_URL, RELAY_JWT_SECRET not set: set them, or run with --demo"},
		{"short secret", with(map[string]string{"RELAY_JWT_SECRET": "short-secret"}), nil, "RELAY_JWT_SECRET: must be at least 32 characters, got 12"},
		{"bad duration", with(map[string]string{"RELAY_SSE_KEEPALIVE": "soon"}), nil, `RELAY_SSE_KEEPALIVE (--sse-keepalive): "soon": want a positive duration`},
		{"negative flush interval", with(map[string]string{"RELAY_SSE_FLUSH_INTERVAL": "-1ms"}), nil, `RELAY_SSE_FLUSH_INTERVAL (--sse-flush-interval): "-1ms": want a duration such as 5ms, or 0`},
		{"negative leeway", with(map[string]string{"RELAY_JWT_LEEWAY": "-1s"}), nil, `RELAY_JWT_LEEWAY (--jwt-leeway): "-1s": want a duration such as 5ms, or 0`},
		{"negative send buffer", with(map[string]string{"RELAY_SSE_SEND_BUFFER": "-1"}), nil, `RELAY_SSE_SEND_BUFFER (--sse-send-buffer): "-1": want a non-negative integer`},
		{"zero buffer", with(map[string]string{"RELAY_SUBSCRIBER_BUFFER": "0"}), nil, `RELAY_SUBSCRIBER_BUFFER (--subscriber-buffer): "0": want a positive integer`},
		{"bad regex", with(map[string]string{"RELAY_KAFKA_TOPICS_REGEX": "("}), nil, `RELAY_KAFKA_TOPICS_REGEX (--kafka-topics-regex): "(":`},
		{"bad log format", with(map[string]string{"RELAY_LOG_FORMAT": "xml"}), nil, `RELAY_LOG_FORMAT (--log-format): "xml": want json or text`},
		{"bad flag value", valid, []string{"--snapshot-limit", "-1"}, `RELAY_SNAPSHOT_LIMIT (--snapshot-limit): "-1"`},
		{"unknown flag", valid, []string{"--no-such-flag"}, "flag provided but not defined: -no-such-flag"},
		{"stray argument", valid, []string{"extra"}, `unexpected argument "extra"`},
		{"database URL with a bad port", with(map[string]string{"RELAY_DATABASE_URL": "postgres://relay:pw@db:port/decnet"}), nil,
			`RELAY_DATABASE_URL (--database-url): "<redacted>": want a URL such as postgres://user:pass@host:5432/db?sslmode=require`},
		{"database URL with a slash in the password", with(map[string]string{"RELAY_DATABASE_URL": "postgres://relay:pw/x@db/decnet"}), nil,
			`RELAY_DATABASE_URL (--database-url): "<redacted>": want a URL`},
		{"database URL of another scheme", with(map[string]string{"RELAY_DATABASE_URL": "mysql://relay:pw@db/decnet"}), nil,
			`RELAY_DATABASE_URL (--database-url): "<redacted>": want a URL`},
		{"database key=value string", with(map[string]string{"RELAY_DATABASE_URL": "host=db user=relay password=pw@db"}), nil,
			`RELAY_DATABASE_URL (--database-url): "<redacted>": want a URL`},
		{"negative user timeout", with(map[string]string{"RELAY_SSE_USER_TIMEOUT": "-1s"}), nil,
			`RELAY_SSE_USER_TIMEOUT (--sse-user-timeout): "-1s": want 0 or a duration of at least 1s`},
		{"user timeout under a second", with(map[string]string{"RELAY_SSE_USER_TIMEOUT": "500ms"}), nil,
			`RELAY_SSE_USER_TIMEOUT (--sse-user-timeout): "500ms": want 0 or a duration of at least 1s`},
		{"trusted proxy not an address", with(map[string]string{"RELAY_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"}), nil,
			`RELAY_TRUSTED_PROXIES (--trusted-proxies): "10.0.0.0/8, proxy.local": "proxy.local" is not an IP address or CIDR`},
		{"trusted proxy with a zone", with(map[string]string{"RELAY_TRUSTED_PROXIES": "fe80::1%eth0"}), nil,
			`RELAY_TRUSTED_PROXIES (--trusted-proxies): "fe80::1%eth0": "fe80::1%eth0" is not an IP address or CIDR`},
		{"trusted proxy CIDR out of range", with(map[string]string{"RELAY_TRUSTED_PROXIES": "10.0.0.0/33"}), nil,
			`RELAY_TRUSTED_PROXIES (--trusted-proxies): "10.0.0.0/33": "10.0.0.0/33" is not an IP address or CIDR`},
		{"negative max lifetime", with(map[string]string{"RELAY_SSE_MAX_LIFETIME": "-1m"}), nil,
			`RELAY_SSE_MAX_LIFETIME (--sse-max-lifetime): "-1m": want a duration such as 5ms, or 0`},
		{"jitter above 1", with(map[string]string{"RELAY_SSE_LIFETIME_JITTER": "1.5"}), nil,
			`RELAY_SSE_LIFETIME_JITTER (--sse-lifetime-jitter): "1.5": want a number from 0 to 1`},
		{"jitter not a number", with(map[string]string{"RELAY_SSE_LIFETIME_JITTER": "NaN"}), nil,
			`RELAY_SSE_LIFETIME_JITTER (--sse-lifetime-jitter): "NaN": want a number from 0 to 1`},
		{"peer without a port", with(map[string]string{"RELAY_PEERS": "relay-peers.decnet"}), nil,
			`RELAY_PEERS (--peers): "relay-peers.decnet": "relay-peers.decnet" is not host:port`},
		{"peer with a named port", with(map[string]string{"RELAY_PEERS": "10.0.0.1:8080,relay-peers:http"}), nil,
			`RELAY_PEERS (--peers): "10.0.0.1:8080,relay-peers:http": "relay-peers:http" is not host:port`},
		{"peer without a host", with(map[string]string{"RELAY_PEERS": ":8080"}), nil,
			`RELAY_PEERS (--peers): ":8080": ":8080" is not host:port`},
		{"rebalance interval below a second", with(map[string]string{"RELAY_REBALANCE_INTERVAL": "500ms"}), nil,
			`RELAY_REBALANCE_INTERVAL (--rebalance-interval): "500ms": want a duration of at least 1s`},
		{"rebalance tolerance above 1", with(map[string]string{"RELAY_REBALANCE_TOLERANCE": "2"}), nil,
			`RELAY_REBALANCE_TOLERANCE (--rebalance-tolerance): "2": want a number from 0 to 1`},
		{"negative shutdown spread", with(map[string]string{"RELAY_SHUTDOWN_SPREAD": "-1s"}), nil,
			`RELAY_SHUTDOWN_SPREAD (--shutdown-spread): "-1s": want a duration such as 5ms, or 0`},
		{"shutdown spread not below the timeout", with(map[string]string{"RELAY_SHUTDOWN_SPREAD": "25s"}), nil,
			"RELAY_SHUTDOWN_SPREAD (25s) must be below RELAY_SHUTDOWN_TIMEOUT (25s)"},
		{"shutdown spread past the timeout, in demo mode too", map[string]string{"RELAY_DEMO": "true", "RELAY_SHUTDOWN_TIMEOUT": "5s", "RELAY_SHUTDOWN_SPREAD": "10s"}, nil,
			"RELAY_SHUTDOWN_SPREAD (10s) must be below RELAY_SHUTDOWN_TIMEOUT (5s)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Load(c.args, env(c.env), &bytes.Buffer{})
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("err %v, want ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("err %q, want one line containing %q", err, c.want)
			}
			for _, secret := range []string{"pw@db", "pw/x", ":pw", "short-secret"} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("err %q echoes a credential", err)
				}
			}
		})
	}
}

// Demo mode needs no Kafka, database or secret.
func TestDemoNeedsNothing(t *testing.T) {
	c, err := Load([]string{"--demo"}, env(nil), &bytes.Buffer{})
	if err != nil || !c.Demo {
		t.Fatalf("demo: %+v %v", c, err)
	}
}

// --help lists every setting with its flag and default, and the README documents every one.
func TestHelpAndReadmeListEverySetting(t *testing.T) {
	var out bytes.Buffer
	if _, err := Load([]string{"--help"}, env(nil), &out); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("--help: %v", err)
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range settings {
		line := s.env + ", --" + s.flag() + " (default "
		if !strings.Contains(out.String(), line) {
			t.Errorf("--help lacks %q", line)
		}
		def := s.def
		if def == "" {
			def = "—"
		}
		if !strings.Contains(string(readme), "`"+s.env+"`") && !strings.Contains(string(readme), "`"+s.env+"` (") {
			t.Errorf("README.md does not document %s", s.env)
		}
		if s.env != "RELAY_DEMO" && !strings.Contains(string(readme), "| `"+s.env+"` | `"+def+"` |") &&
			!strings.Contains(string(readme), "| `"+s.env+"` | "+def+" |") {
			t.Errorf("README.md does not give %s's default %q", s.env, def)
		}
	}
}

// Database URLs lib/pq takes, a user timeout of 0 (the kernel's) and proxy
// lists of addresses and networks are accepted.
func TestAcceptedValues(t *testing.T) {
	for _, u := range []string{"postgres://relay:pw@db:5432/decnet?sslmode=require", "postgresql://db/decnet", "postgres:///decnet?host=/run/postgresql"} {
		c, err := Load(nil, env(with(map[string]string{"RELAY_DATABASE_URL": u})), &bytes.Buffer{})
		if err != nil || c.DatabaseURL != u {
			t.Errorf("RELAY_DATABASE_URL %q: %v", u, err)
		}
	}
	c, err := Load([]string{"--sse-user-timeout", "0", "--trusted-proxies", "10.0.0.1, 192.168.0.0/16,::1"}, env(valid), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.UserTimeout != 0 || strings.Join(c.TrustedProxies, " ") != "10.0.0.1 192.168.0.0/16 ::1" {
		t.Fatalf("user timeout %v, trusted proxies %q", c.UserTimeout, c.TrustedProxies)
	}
}

// A flush interval of 0 is allowed (every event is written at once), and so
// is a send buffer of 0 (the kernel sizes it).
func TestZeroFlushIntervalAndSendBuffer(t *testing.T) {
	c, err := Load([]string{"--sse-flush-interval", "0", "--sse-send-buffer", "0"}, env(valid), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.FlushInterval != 0 || c.SendBuffer != 0 {
		t.Fatalf("flush interval %v, send buffer %d, want 0 and 0", c.FlushInterval, c.SendBuffer)
	}
}

// Peers are a static list or names (a headless Service's) with ports; the
// rebalance interval and tolerance take their bounds.
func TestPeersAndRebalance(t *testing.T) {
	c, err := Load([]string{"--peers", "relay-peers.decnet.svc.cluster.local:8080, 127.0.0.1:9001,[::1]:9002",
		"--rebalance-interval", "1s", "--rebalance-tolerance", "0"}, env(valid), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"relay-peers.decnet.svc.cluster.local:8080", "127.0.0.1:9001", "[::1]:9002"}
	if strings.Join(c.Peers, " ") != strings.Join(want, " ") || c.RebalanceInterval != time.Second || c.RebalanceTol != 0 {
		t.Fatalf("peers %q interval %v tolerance %v", c.Peers, c.RebalanceInterval, c.RebalanceTol)
	}
}

// A stream lifetime with its jitter (0 and 1 included) and a shutdown spread
// below the shutdown timeout are accepted.
func TestLifetimeAndSpread(t *testing.T) {
	for _, tc := range []struct {
		args     []string
		lifetime time.Duration
		jitter   float64
		spread   time.Duration
	}{
		{[]string{"--sse-max-lifetime", "30m", "--sse-lifetime-jitter", "0", "--shutdown-spread", "10s"}, 30 * time.Minute, 0, 10 * time.Second},
		{[]string{"--sse-max-lifetime", "2s", "--sse-lifetime-jitter", "1", "--shutdown-spread", "24.9s"}, 2 * time.Second, 1, 24900 * time.Millisecond},
	} {
		c, err := Load(tc.args, env(valid), &bytes.Buffer{})
		if err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if c.MaxLifetime != tc.lifetime || c.LifetimeJitter != tc.jitter || c.ShutdownSpread != tc.spread {
			t.Errorf("%q: lifetime %v jitter %v spread %v", tc.args, c.MaxLifetime, c.LifetimeJitter, c.ShutdownSpread)
		}
	}
}
