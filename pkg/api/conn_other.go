//go:build !linux

package api

import (
	"net"
	"time"
)

// setUserTimeout does nothing: TCP_USER_TIMEOUT is Linux's, where the relay
// runs in production; elsewhere (a developer's machine) TCP keepalive alone
// bounds how long a vanished client holds its slot.
func setUserTimeout(*net.TCPConn, time.Duration) error { return nil }
