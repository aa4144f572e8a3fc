package sse_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/pkg/sse"
)

// FuzzEncode guards the SSE framing: whatever Encode accepts becomes exactly
// an "id:" line (when the id is not empty), one "event:" line and one "data:"
// line a strict parser reads back, with the id, topic, type, ts and payload
// intact; what it refuses is refused for a reason.
func FuzzEncode(f *testing.F) {
	seeds := []struct {
		topic, typ, ts, payload, id string
	}{
		{"identity.formed", "formed", "1750000000.123", `{"identity_uuid":"a","observation_uuids":["o1"]}`, "2a0f3c:5"},
		{"identity.observation.linked", "observation.linked", "1750000000", `{"identity_uuid":"a","observation_uuid":"o"}`, ""},
		{"identity.campaign.assigned", "campaign.assigned", "-1.5e3", `{"campaign_uuid":"c","prior_campaign_uuid":null}`, "x"},
		{"other.topic", "t", "0", `{}`, "0"},
		{"identity.", "", "1", `{ "a" : [ 1 , 2 ] }`, ""},
		{"identity.x", "a\nb\r\u2028<>&", "1", `{"s":"\n\ndata: x\r\u0000\u001f\u2028<script>"}`, ""},
		{"identity.x", "t", " 1.5\n", "{\r\n \"a\":\t1\n}\n", "a b:c"},
		{"identity. spaced", "t", "1", `{}`, ""},
		{"identity.a:b", "t", "1", `{"é":"ü"}`, ""},
		{"", "t", "1", `{}`, ""},
		{"identity.\n", "t", "1", `{}`, ""},
		{"identity.a\rb", "t", "1", `{}`, ""},
		{"identity.\xff", "t", "1", `{}`, ""},
		{"identity.x", "\xff", "1", `{}`, ""},
		{"identity.x", "t", "1", "{\"a\":\"\xff\"}", ""},
		{"identity.x", "t", "", `{}`, ""},
		{"identity.x", "t", "1", `{`, ""},
		{"identity.x", "t", "1", `null`, ""},
	}
	for _, id := range []string{"1\n", "a\rb", "\x00", "\xff", " "} {
		seeds = append(seeds, struct{ topic, typ, ts, payload, id string }{"identity.formed", "formed", "1", "{}", id})
	}
	for _, s := range seeds {
		f.Add(s.topic, s.typ, s.ts, []byte(s.payload), s.id)
	}
	f.Fuzz(func(t *testing.T, topic, typ, ts string, payload []byte, id string) {
		ev := sse.Event{Topic: topic, Type: typ, TS: ts, Payload: payload}
		name := sse.EventName(topic)
		fr, err := sse.Encode(ev, id)
		if err != nil {
			usableName := name != "" && !strings.ContainsAny(name, "\r\n") && utf8.ValidString(name)
			if errors.Is(err, sse.ErrBadName) == usableName {
				t.Fatalf("Encode(topic %q) error %v, event name usable: %v", topic, err, usableName)
			}
			if errors.Is(err, sse.ErrNotUTF8) && utf8.ValidString(typ) && utf8.ValidString(ts) && utf8.Valid(payload) {
				t.Fatalf("Encode refused UTF-8 input as not UTF-8: %q %q %q", typ, ts, payload)
			}
			usableID := !strings.ContainsAny(id, "\r\n\x00") && utf8.ValidString(id)
			if errors.Is(err, sse.ErrBadID) && usableID {
				t.Fatalf("Encode refused the usable id %q", id)
			}
			return
		}
		checkFrame(t, fr.Bytes, ev, id)
	})
}

// checkFrame asserts that b is the one frame of ev and id, read back by a
// strict parser.
func checkFrame(t *testing.T, b []byte, ev sse.Event, id string) {
	t.Helper()
	f, err := ssetest.ParseEvent(b) // refuses a CR anywhere
	if err != nil {
		t.Fatalf("strict parse of %q: %v", b, err)
	}
	if f.HasID != (id != "") || f.ID != id {
		t.Fatalf("id %q (present %v), want %q (frame %q)", f.ID, f.HasID, id, b)
	}
	if want := sse.EventName(ev.Topic); f.Event != want {
		t.Fatalf("event name %q, want %q (frame %q)", f.Event, want, b)
	}
	data := []byte(f.Data[0])
	var compact bytes.Buffer
	if err := json.Compact(&compact, data); err != nil {
		t.Fatalf("data is not JSON: %v (frame %q)", err, b)
	}
	if !bytes.Equal(compact.Bytes(), data) {
		t.Fatalf("data is not compact JSON: %q", data)
	}
	var got struct {
		Topic   *string         `json:"topic"`
		Type    *string         `json:"type"`
		TS      json.RawMessage `json:"ts"`
		Payload json.RawMessage `json:"payload"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("data %q: %v", data, err)
	}
	if got.Topic == nil || *got.Topic != ev.Topic {
		t.Fatalf("data topic differs from %q (data %q)", ev.Topic, data)
	}
	if got.Type == nil || *got.Type != ev.Type {
		t.Fatalf("data type differs from %q (data %q)", ev.Type, data)
	}
	if !ssetest.SameJSON(t, got.TS, []byte(ev.TS)) {
		t.Fatalf("data ts %s, want %q", got.TS, ev.TS)
	}
	if !ssetest.SameJSON(t, got.Payload, ev.Payload) {
		t.Fatalf("data payload %s, want %q", got.Payload, ev.Payload)
	}
}
