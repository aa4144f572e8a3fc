package main

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
	"github.com/decnet/identity-relay/pkg/api"
)

// `relay check-stream`, the chart's helm test, against a real relay: it reads
// the snapshot frame as an existing user, only checks for a 200 without
// --user, and fails with a message naming the cause for an unknown user, a
// token signed with another secret, an unreachable URL and a missing secret.
func TestCheckStream(t *testing.T) {
	db := relaytest.DB(t)
	env := relaytest.Env(t, testenv.KafkaBrokers(t))
	env["RELAY_JWT_ISSUER"], env["RELAY_JWT_AUDIENCE"] = "decnet", "relay"
	relay := relaytest.Start(t, env)
	relay.WaitReady(t)
	user := relaytest.AddUser(t, db, "viewer")
	stream := relay.URL + api.EventsPath

	check := func(secret string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, relaytest.Binary(t), append([]string{"check-stream"}, args...)...)
		cmd.Env = []string{"RELAY_JWT_ISSUER=decnet", "RELAY_JWT_AUDIENCE=relay"}
		if secret != "" {
			cmd.Env = append(cmd.Env, "RELAY_JWT_SECRET="+secret)
		}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	out, err := check(relaytest.Secret, "--url", stream, "--user", user)
	if err != nil || !strings.Contains(out, "read a frame from") || !strings.Contains(out, "event: snapshot\ndata: {\"identities\":") {
		t.Errorf("check-stream as an existing user: err %v, want the snapshot frame printed:\n%s", err, out)
	}
	out, err = check("", "--url", relay.URL+"/readyz")
	if err != nil || !strings.Contains(out, "200 OK") || !strings.Contains(out, "the stream was not opened") {
		t.Errorf("check-stream without --user on /readyz: err %v, want 200 and a note:\n%s", err, out)
	}

	for _, c := range []struct {
		name, secret string
		args         []string
		want         string
	}{
		{"unknown user", relaytest.Secret, []string{"--url", stream, "--user", "no-such-user"}, "401 Unauthorized"},
		{"another secret", strings.Repeat("x", 40), []string{"--url", stream, "--user", user}, "401 Unauthorized"},
		{"unreachable", relaytest.Secret, []string{"--url", "http://127.0.0.1:1" + api.EventsPath, "--user", user, "--timeout", "5s"}, "connection refused"},
		{"no secret", "", []string{"--url", stream, "--user", user}, "RELAY_JWT_SECRET is not set"},
		{"no url", relaytest.Secret, []string{"--user", user}, "--url is required"},
	} {
		out, err := check(c.secret, c.args...)
		if code := exitCode(err); code != 1 || !strings.Contains(out, "relay: check-stream") || !strings.Contains(out, c.want) {
			t.Errorf("%s: exit %d, want 1 and %q in:\n%s", c.name, code, c.want, out)
		}
	}
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}
