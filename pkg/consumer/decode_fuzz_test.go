package consumer_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/pkg/consumer"
	"github.com/decnet/identity-relay/pkg/sse"
)

// FuzzDecode guards the record decoder against any Kafka record: it never
// panics, it skips with the reason CONTRACT.md's rules give, and what it
// accepts encodes to one strictly valid SSE frame carrying the record's
// topic, type, ts and payload as the rules say.
func FuzzDecode(f *testing.F) {
	seeds := []struct {
		topic    string
		ms       int64
		value    string
		maxBytes int
	}{
		{"identity.formed", 1750000000123, `{"v":1,"id":"ab","topic":"x","type":"formed","ts":1750000000.123,"payload":{"identity_uuid":"a","observation_uuids":["o"]}}`, 4096},
		{"identity.observation.linked", 1750000000000, `{"identity_uuid":"a","observation_uuid":"o","type":1,"ts":"x"}`, 0},
		{"identity.campaign.assigned", 0, `{"payload":null,"type":null,"ts":null}`, 0},
		{"identity.merged", -1, `{"payload":{"winner_uuid":"w","loser_uuid":"l"},"ts":1e400}`, 0},
		{"identity.unmerged", 1, `{"payload":{"resurrected_uuid":"\n\ndata: x\r"},"type":"a\u2028"}`, 0},
		{"other.topic", 1, `{"payload":[1]}`, 0},
		{"identity.formed", 1, `{"type":5,"payload":{}}`, 0},
		{"identity.formed", 1, `{"ts":"1","payload":{}}`, 0},
		{"identity.formed", 1, " [1] ", 0},
		{"identity.formed", 1, `null`, 0},
		{"identity.formed", 1, ``, 0},
		{"identity.formed", 1, "{\"a\":\"\xff\"}", 0},
		{"identity.formed", 1, `{"a":1}`, 3},
		{"identity.formed", 1, "{\r\n\"payload\" :\t{ }\r\n}", 0},
		{"identity.formed", 1, `{"payload":{},"payload":null}`, 0},
		{"", 1, `{}`, 0},
		{"identity.", 1, `{}`, 0},
		{"identity.a\nb", 1, `{}`, 0},
		{"identity.\xff", 1, `{}`, 0},
	}
	for _, s := range seeds {
		f.Add(s.topic, s.ms, []byte(s.value), s.maxBytes)
	}
	f.Fuzz(func(t *testing.T, topic string, ms int64, value []byte, maxBytes int) {
		recTS := time.UnixMilli(ms)
		ev, err := consumer.Decode(topic, recTS, value, maxBytes)
		if err != nil {
			checkSkipReason(t, err, value, maxBytes)
			return
		}
		if want := oracleSkip(value, maxBytes); want != "" {
			t.Fatalf("Decode accepted %q (maxBytes %d), want skip %q", value, maxBytes, want)
		}
		fr, err := sse.Encode(ev, "")
		if err != nil {
			name := sse.EventName(topic)
			usable := name != "" && !strings.ContainsAny(name, "\r\n") && utf8.ValidString(name)
			if !errors.Is(err, sse.ErrBadName) || usable {
				t.Fatalf("Encode of decoded %+v: %v", ev, err)
			}
			return // the consumer counts it as bad_topic
		}
		checkDecodedFrame(t, fr.Bytes, topic, recTS, value)
	})
}

// oracleSkip returns the skip reason CONTRACT.md gives a value before its
// fields are read, or "" when the value is a JSON object within the limit.
func oracleSkip(value []byte, maxBytes int) string {
	switch {
	case maxBytes > 0 && len(value) > maxBytes:
		return consumer.SkipTooLarge
	case !utf8.Valid(value):
		return consumer.SkipInvalidUTF8
	case !json.Valid(value):
		return consumer.SkipNotJSON
	}
	// json.Unmarshal takes null into a map, so look at the value itself.
	if !bytes.HasPrefix(bytes.TrimLeft(value, " \t\r\n"), []byte("{")) {
		return consumer.SkipNotObject
	}
	return ""
}

// checkSkipReason asserts that a refusal has a reason and the right one.
func checkSkipReason(t *testing.T, err error, value []byte, maxBytes int) {
	t.Helper()
	var se *consumer.SkipError
	if !errors.As(err, &se) {
		t.Fatalf("Decode error %v (%T) is not a *SkipError", err, err)
	}
	want := oracleSkip(value, maxBytes)
	if want != "" {
		if se.Reason != want {
			t.Fatalf("Decode(%q, maxBytes %d) skip %q, want %q", value, maxBytes, se.Reason, want)
		}
		return
	}
	// A JSON object is refused only as an envelope with a bad field.
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(value, &obj); err != nil {
		t.Fatalf("oracle: %v", err)
	}
	if _, ok := obj["payload"]; !ok {
		t.Fatalf("Decode skipped the bare payload %q: %v", value, se)
	}
	switch se.Reason {
	case consumer.SkipBadPayload, consumer.SkipBadType, consumer.SkipBadTS:
	default:
		t.Fatalf("Decode skipped the envelope %q with reason %q", value, se.Reason)
	}
}

// checkDecodedFrame asserts that b is the one strictly valid frame of the
// record (topic, recTS, value), with the fields CONTRACT.md "Input" gives it.
func checkDecodedFrame(t *testing.T, b []byte, topic string, recTS time.Time, value []byte) {
	t.Helper()
	f, err := ssetest.ParseEvent(b) // refuses a CR anywhere
	if err != nil {
		t.Fatalf("strict parse of %q: %v", b, err)
	}
	name := sse.EventName(topic)
	if f.Event != name {
		t.Fatalf("event %q, want %q", f.Event, name)
	}
	var got struct {
		Topic   string          `json:"topic"`
		Type    string          `json:"type"`
		TS      json.RawMessage `json:"ts"`
		Payload json.RawMessage `json:"payload"`
	}
	dec := json.NewDecoder(strings.NewReader(f.Data[0]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("data %q: %v", f.Data[0], err)
	}
	if got.Topic != topic {
		t.Fatalf("data topic %q, want %q", got.Topic, topic)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(value, &fields); err != nil {
		t.Fatalf("oracle: %v", err)
	}
	wantType, wantTS, wantPayload := name, "", value
	envPayload, isEnvelope := fields["payload"]
	if isEnvelope {
		wantPayload = envPayload
		if string(envPayload) == "null" {
			wantPayload = []byte("{}")
		}
		if raw, ok := fields["type"]; ok && string(raw) != "null" {
			if err := json.Unmarshal(raw, &wantType); err != nil {
				t.Fatalf("Decode accepted the type %s", raw)
			}
		}
		if raw, ok := fields["ts"]; ok && string(raw) != "null" {
			wantTS = string(raw)
		}
	}
	if got.Type != wantType {
		t.Fatalf("data type %q, want %q (value %q)", got.Type, wantType, value)
	}
	if wantTS != "" {
		if string(got.TS) != wantTS {
			t.Fatalf("data ts %s, want the envelope's %s digit for digit", got.TS, wantTS)
		}
	} else {
		secs, err := strconv.ParseFloat(string(got.TS), 64)
		if err != nil || secs != float64(recTS.UnixMilli())/1000 {
			t.Fatalf("data ts %s, want the record timestamp %d ms as seconds", got.TS, recTS.UnixMilli())
		}
	}
	if !bytes.HasPrefix(got.Payload, []byte("{")) {
		t.Fatalf("data payload %s is not an object", got.Payload)
	}
	if !ssetest.SameJSON(t, got.Payload, wantPayload) {
		t.Fatalf("data payload %s, want %s", got.Payload, wantPayload)
	}
}
