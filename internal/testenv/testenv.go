// Package testenv gives tests the external services they need: the
// PostgreSQL and Kafka that scripts/test.sh (make test) or make services-up
// start, found through environment variables.
//
//	RELAY_TEST_DATABASE_URL      postgres://... URL of the test database
//	RELAY_TEST_KAFKA_BROKERS     comma-separated host:port list
//	RELAY_TEST_PG_SCRIPT         absolute path of scripts/pg.sh (stop/start)
//	RELAY_TEST_KAFKA_SCRIPT      absolute path of scripts/kafka.sh (stop/start)
//	RELAY_TEST_CHROMIUM          the Chromium for the browser tests
//	                             (scripts/chromium.sh installs it)
//	RELAY_TEST_REQUIRE_SERVICES  "1": a missing variable fails the test
//	                             instead of skipping it (set by make test)
//
// Tests that stop and start a service (StopKafka, StartPostgres, ...) affect
// every test using it at the same time; make test therefore runs test
// packages one at a time (go test -p 1), and such a test must not call
// t.Parallel.
package testenv

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Environment variable names.
const (
	EnvDatabaseURL     = "RELAY_TEST_DATABASE_URL"
	EnvKafkaBrokers    = "RELAY_TEST_KAFKA_BROKERS"
	EnvPGScript        = "RELAY_TEST_PG_SCRIPT"
	EnvKafkaScript     = "RELAY_TEST_KAFKA_SCRIPT"
	EnvChromium        = "RELAY_TEST_CHROMIUM"
	EnvRequireServices = "RELAY_TEST_REQUIRE_SERVICES"
	scriptTimeout      = 3 * time.Minute
	missingServiceHint = "run `make test`, or `make services-up` and export what it prints"
)

// RequireServices reports whether a missing service must fail the test
// rather than skip it (RELAY_TEST_REQUIRE_SERVICES=1, set by make test).
func RequireServices() bool {
	return os.Getenv(EnvRequireServices) == "1"
}

// lookup returns the non-empty value of env, or fails/skips t.
func lookup(t testing.TB, env, what string) string {
	t.Helper()
	v := strings.TrimSpace(os.Getenv(env))
	if v != "" {
		return v
	}
	if RequireServices() {
		t.Fatalf("%s is not set but %s=1: %s is required; %s", env, EnvRequireServices, what, missingServiceHint)
	}
	t.Skipf("%s is not set (%s); %s", env, what, missingServiceHint)
	return ""
}

// DatabaseURL returns the URL of the test database (RELAY_TEST_DATABASE_URL).
func DatabaseURL(t testing.TB) string {
	t.Helper()
	return lookup(t, EnvDatabaseURL, "PostgreSQL")
}

// KafkaBrokers returns the test Kafka's seed brokers (RELAY_TEST_KAFKA_BROKERS).
func KafkaBrokers(t testing.TB) []string {
	t.Helper()
	raw := lookup(t, EnvKafkaBrokers, "Kafka")
	var out []string
	for _, b := range strings.Split(raw, ",") {
		if b = strings.TrimSpace(b); b != "" {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		t.Fatalf("%s=%q holds no broker address", EnvKafkaBrokers, raw)
	}
	return out
}

// Chromium returns the path of the browser for the browser tests (RELAY_TEST_CHROMIUM).
func Chromium(t testing.TB) string {
	t.Helper()
	return lookup(t, EnvChromium, "Chromium")
}

// StopKafka stops the test broker; its data stays for StartKafka.
func StopKafka(t testing.TB) { t.Helper(); runScript(t, EnvKafkaScript, "Kafka", "stop") }

// StartKafka starts the test broker on its existing data and returns once it
// answers metadata requests. Starting a running broker is a no-op.
func StartKafka(t testing.TB) { t.Helper(); runScript(t, EnvKafkaScript, "Kafka", "start") }

// StopPostgres stops the test PostgreSQL (pg_ctl stop -m fast); its data stays.
func StopPostgres(t testing.TB) { t.Helper(); runScript(t, EnvPGScript, "PostgreSQL", "stop") }

// StartPostgres starts the test PostgreSQL again and returns once it accepts
// connections. Starting a running server is a no-op.
func StartPostgres(t testing.TB) { t.Helper(); runScript(t, EnvPGScript, "PostgreSQL", "start") }

func runScript(t testing.TB, env, what, action string) {
	t.Helper()
	script := lookup(t, env, what+" control script")
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "bash", script, action)
	// The scripts' own settings (RELAY_TEST_STATE, ports) come from the
	// environment the test run inherited, so they match the running services.
	cmd.Env = os.Environ()
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v (after %s)\n%s", script, action, err, time.Since(start).Round(time.Millisecond), out)
	}
	t.Logf("%s %s took %s", what, action, time.Since(start).Round(time.Millisecond))
}
