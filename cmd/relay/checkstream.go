package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// checkStream is `relay check-stream`, the chart's `helm test`: with --user it
// mints a short-lived token for that user from the relay's own settings
// (RELAY_JWT_SECRET, RELAY_JWT_ISSUER, RELAY_JWT_AUDIENCE), opens the stream
// at --url and returns once it has read one complete frame (the snapshot,
// read from PostgreSQL), printing it. Without --user it only checks that --url
// answers 200 (the chart then passes /readyz).
func checkStream(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("relay check-stream", flag.ContinueOnError)
	fs.SetOutput(stderr)
	url := fs.String("url", "", "the stream's URL, e.g. http://relay:8080/api/v1/identities/events (required)")
	user := fs.String("user", "", "uuid of a user in PostgreSQL to open the stream as; when empty, --url need only answer 200")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *url == "" {
		return errors.New("check-stream: --url is required")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, *url, nil)
	if err != nil {
		return fmt.Errorf("check-stream: %w", err)
	}
	if *user != "" {
		tok, err := checkToken(getenv, *user)
		if err != nil {
			return fmt.Errorf("check-stream: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Accept", "text/event-stream")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("check-stream: GET %s: %w", *url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("check-stream: GET %s: %s: %s", *url, resp.Status, strings.TrimSpace(string(body)))
	}
	if *user == "" {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		fmt.Fprintf(stdout, "GET %s: %s %s (no --user: the stream was not opened)\n", *url, resp.Status, strings.TrimSpace(string(body)))
		return nil
	}
	frame, err := firstFrame(bufio.NewReader(resp.Body))
	if err != nil {
		return fmt.Errorf("check-stream: %s as user %s: no complete frame: %w", *url, *user, err)
	}
	fmt.Fprintf(stdout, "read a frame from %s as user %s:\n%s\n", *url, *user, frame)
	return nil
}

// checkToken mints a one-minute token for user with the claims the relay
// checks (CONTRACT.md).
func checkToken(getenv func(string) string, user string) (string, error) {
	secret := getenv("RELAY_JWT_SECRET")
	if secret == "" {
		return "", errors.New("RELAY_JWT_SECRET is not set: it signs the token the check opens the stream with")
	}
	var jti [8]byte
	_, _ = rand.Read(jti[:])
	now := time.Now()
	claims := jwt.MapClaims{"uuid": user, "jti": "check-stream-" + hex.EncodeToString(jti[:]), "iat": now.Unix(), "exp": now.Add(time.Minute).Unix()}
	if v := getenv("RELAY_JWT_ISSUER"); v != "" {
		claims["iss"] = v
	}
	if v := getenv("RELAY_JWT_AUDIENCE"); v != "" {
		claims["aud"] = v
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
}

// maxCheckFrame bounds what firstFrame prints of a frame (a snapshot can be large).
const maxCheckFrame = 2048

// firstFrame reads up to the end of the first frame with an event or data
// field (comments such as the first `: keepalive` are skipped) and returns it,
// shortened to maxCheckFrame. An `error` event is an error.
func firstFrame(r *bufio.Reader) (string, error) {
	var b strings.Builder
	isFrame := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("the stream ended")
			}
			return "", err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			if isFrame {
				s := b.String()
				if strings.HasPrefix(s, "event: error\n") {
					return "", fmt.Errorf("the relay sent an error frame: %s", s)
				}
				return s, nil
			}
			b.Reset()
			continue
		}
		isFrame = isFrame || strings.HasPrefix(line, "event:") || strings.HasPrefix(line, "data:")
		if b.Len() < maxCheckFrame {
			if len(line) > maxCheckFrame-b.Len() {
				line = line[:maxCheckFrame-b.Len()] + "…"
			}
			b.WriteString(line + "\n")
		}
	}
}
