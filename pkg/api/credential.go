package api

import (
	"context"
	"math"
	"time"
)

// An open stream lives no longer than its credential (CONTRACT.md "After the
// connection is open"). A timer per stream fires at the token's exp, or
// earlier when the cached lookups behind its last check expire; then the
// stream re-checks through the cache. Streams of one user thus re-check
// together and share one query per AuthCacheTTL, and a stream sees a
// revocation, a moved cut-off or a role change at most AuthCacheTTL (plus
// one lookup) after the database does. The timer's own goroutine does the
// check, not run, so a slow database never holds up frames; run only
// watches v.ending, which endFor closes when the credential is refused.

// minRecheck spaces re-checks whose lookups were not cached: after a
// failed lookup, or with no cache at all.
const minRecheck = time.Second

// watchCredential starts the timer; run stops it when the stream ends.
func (v *viewer) watchCredential() {
	// Armed only once v.credTimer is set: the callback re-arms it.
	v.credTimer = time.AfterFunc(math.MaxInt64, v.checkCredential)
	v.credTimer.Reset(v.untilCheck(v.recheck))
}

// checkCredential runs on the timer's goroutine, one call at a time: the
// next is armed only at the end of this one.
func (v *viewer) checkCredential() {
	s := v.s
	select {
	case <-v.sub.Done():
		return // the stream is ending anyway
	default:
	}
	if !time.Now().Before(v.cred.ExpiresAt.Time) {
		s.log.Info("token expired; ending its stream")
		v.endFor(reasonCredential)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DBTimeout)
	code, _, until, err := s.check(ctx, v.cred)
	cancel()
	switch {
	case err != nil:
		// The database, not the credential: cutting every stream because
		// the database blinked would make every browser reconnect into
		// 503s. Keep the stream and try again.
		s.m.rechecksFailed.Inc()
		if !v.recheckFailed {
			s.log.Warn("credential re-check failed; the stream goes on until the database answers", "err", err)
		}
		v.recheckFailed = true
	case code != 0:
		s.log.Info("credential no longer valid; ending its stream", "status", code)
		v.endFor(reasonCredential)
		return
	default:
		v.recheckFailed = false
	}
	v.credTimer.Reset(v.untilCheck(until))
}

// untilCheck is how long to wait before the next check: until the lookups
// leave the cache (minRecheck or AuthCacheTTL, the longer, when they were
// not cached), or until exp when that comes first.
func (v *viewer) untilCheck(until time.Time) time.Duration {
	now := time.Now()
	if until.IsZero() {
		until = now.Add(max(minRecheck, v.s.cfg.AuthCacheTTL))
	}
	if exp := v.cred.ExpiresAt.Time; exp.Before(until) {
		until = exp
	}
	return until.Sub(now)
}
