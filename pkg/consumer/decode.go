package consumer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/decnet/identity-relay/pkg/sse"
)

// SkipError says why a record was not turned into an event. Reason is the
// value of the relay_records_skipped_total{reason} label.
type SkipError struct {
	Reason string
	Detail string
}

func (e *SkipError) Error() string { return "skip record: " + e.Reason + ": " + e.Detail }

func skip(reason, format string, args ...any) *SkipError {
	return &SkipError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// Skip reasons, one per kind of bad input (RELIABILITY.md lists them).
const (
	SkipTooLarge    = "too_large"    // value over the configured maximum
	SkipInvalidUTF8 = "invalid_utf8" // value is not UTF-8
	SkipNotJSON     = "not_json"     // value is not JSON at all (includes empty values)
	SkipNotObject   = "not_object"   // JSON, but an array, string, number, bool or null
	SkipBadPayload  = "bad_payload"  // envelope whose payload is neither an object nor null
	SkipBadType     = "bad_type"     // envelope whose type is neither a string nor null
	SkipBadTS       = "bad_ts"       // envelope whose ts is not a finite number
	SkipBadTopic    = "bad_topic"    // topic that cannot name an SSE event
	// SkipTooManyPartitions: a partition past the 1,024 a stream id can name.
	SkipTooManyPartitions = "too_many_partitions"
)

// Decode maps one Kafka record to the event browsers see (CONTRACT.md, "Input").
// An object with a "payload" key is an envelope; any other object is itself the
// payload and takes type = event name and ts = the record timestamp. The topic
// always comes from Kafka. A non-nil error is a *SkipError.
func Decode(topic string, recordTS time.Time, value []byte, maxBytes int) (sse.Event, error) {
	ev := sse.Event{Topic: topic}
	if maxBytes > 0 && len(value) > maxBytes {
		return ev, skip(SkipTooLarge, "%d bytes, limit %d", len(value), maxBytes)
	}
	if !utf8.Valid(value) {
		return ev, skip(SkipInvalidUTF8, "value is not valid UTF-8")
	}
	if !json.Valid(value) {
		return ev, skip(SkipNotJSON, "value is not JSON")
	}
	trimmed := bytes.TrimLeft(value, " \t\r\n")
	if trimmed[0] != '{' {
		return ev, skip(SkipNotObject, "value is JSON but not an object")
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(value, &fields); err != nil {
		return ev, skip(SkipNotJSON, "%v", err)
	}
	name := sse.EventName(topic)
	ev.Type = name
	ev.TS = epochSeconds(recordTS)

	payload, isEnvelope := fields["payload"]
	if !isEnvelope {
		ev.Payload = value
		return ev, nil
	}
	switch {
	case isNull(payload):
		ev.Payload = json.RawMessage("{}")
	case payload[0] == '{':
		ev.Payload = payload
	default:
		return ev, skip(SkipBadPayload, "envelope payload is not an object")
	}
	if raw, ok := fields["type"]; ok && !isNull(raw) {
		var t string
		if err := json.Unmarshal(raw, &t); err != nil {
			return ev, skip(SkipBadType, "envelope type is not a string")
		}
		ev.Type = t
	}
	if raw, ok := fields["ts"]; ok && !isNull(raw) {
		if !isFiniteNumber(raw) {
			return ev, skip(SkipBadTS, "envelope ts is not a finite number")
		}
		ev.TS = string(raw)
	}
	return ev, nil
}

// epochSeconds renders a record timestamp as epoch seconds with millisecond
// precision and no trailing zeros: 1750000000.123.
func epochSeconds(t time.Time) string {
	return strconv.FormatFloat(float64(t.UnixMilli())/1000, 'f', -1, 64)
}

func isNull(raw json.RawMessage) bool { return string(raw) == "null" }

// isFiniteNumber reports whether raw (valid JSON) is a number that a float64
// holds: 1e400 is valid JSON but becomes Infinity in a browser.
func isFiniteNumber(raw json.RawMessage) bool {
	if len(raw) == 0 || (raw[0] != '-' && (raw[0] < '0' || raw[0] > '9')) {
		return false
	}
	_, err := strconv.ParseFloat(string(raw), 64)
	return err == nil
}
