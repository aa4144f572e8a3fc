package consumer_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/pkg/consumer"
	"github.com/decnet/identity-relay/pkg/sse"
)

// recordTS is the Kafka record timestamp of the tests: 1750000000.123 s.
var recordTS = time.UnixMilli(1750000000123)

// testMaxBytes is the record size limit the tests pass to Decode.
const testMaxBytes = 4096

// decodeFrame decodes a record and encodes the event as the broadcaster does.
func decodeFrame(t *testing.T, topic string, ts time.Time, value string, maxBytes int) (string, error) {
	t.Helper()
	ev, err := consumer.Decode(topic, ts, []byte(value), maxBytes)
	if err != nil {
		return "", err
	}
	f, err := sse.Encode(ev, "")
	if err != nil {
		t.Fatalf("Encode(%+v): %v", ev, err)
	}
	return string(f.Bytes), nil
}

// frame builds the expected frame of an event.
func frame(name, data string) string { return "event: " + name + "\ndata: " + data + "\n\n" }

// TestDecode guards CONTRACT.md "Input": how each kind of record value becomes
// the frame browsers see, byte for byte, or is skipped with the right reason.
func TestDecode(t *testing.T) {
	tests := []struct {
		name     string
		topic    string // identity.formed when empty
		ts       time.Time
		value    string
		maxBytes int // testMaxBytes when 0
		want     string
		wantSkip string
	}{
		// Envelopes.
		{
			name:  "envelope: type, ts, payload from it; topic from Kafka",
			value: `{"v":1,"id":"ab12","topic":"identity.evil","type":"formed","ts":1750000000.5,"payload":{"identity_uuid":"a","observation_uuids":["o1","o2"]}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.5,"payload":{"identity_uuid":"a","observation_uuids":["o1","o2"]}}`),
		},
		{
			name:  "envelope: publisher's type kept even when it differs from the event name",
			value: `{"type":"custom","ts":1,"payload":{}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"custom","ts":1,"payload":{}}`),
		},
		{
			name:  "envelope: ts passes digit for digit",
			value: `{"type":"formed","ts":1750000000.1230,"payload":{}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.1230,"payload":{}}`),
		},
		{
			name:  "envelope: exponent and negative ts",
			value: `{"type":"formed","ts":-1.75E9,"payload":{}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":-1.75E9,"payload":{}}`),
		},
		{
			name:  "envelope: pretty-printed with CRLF whitespace is compacted",
			value: "{\r\n  \"type\" : \"formed\",\r\n  \"ts\" : 2 ,\n\t\"payload\" : { \"identity_uuid\" : \"a\" }\r\n}\r\n",
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":2,"payload":{"identity_uuid":"a"}}`),
		},
		{
			name:  "envelope: missing type takes the event name",
			topic: "identity.observation.linked",
			value: `{"ts":3,"payload":{"identity_uuid":"a","observation_uuid":"o"}}`,
			want:  frame("observation.linked", `{"topic":"identity.observation.linked","type":"observation.linked","ts":3,"payload":{"identity_uuid":"a","observation_uuid":"o"}}`),
		},
		{
			name:  "envelope: null type takes the event name",
			value: `{"type":null,"ts":3,"payload":{}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":3,"payload":{}}`),
		},
		{
			name:  "envelope: missing ts takes the record timestamp",
			value: `{"type":"formed","payload":{"identity_uuid":"a"}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{"identity_uuid":"a"}}`),
		},
		{
			name:  "envelope: null ts takes the record timestamp",
			value: `{"type":"formed","ts":null,"payload":{}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{}}`),
		},
		{
			name:  "envelope: only a payload key",
			value: `{"payload":{"identity_uuid":"a"}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{"identity_uuid":"a"}}`),
		},
		{
			name:  "envelope: null payload carries {}",
			value: `{"type":"formed","ts":4,"payload":null}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":4,"payload":{}}`),
		},
		{name: "envelope: array payload", value: `{"type":"formed","payload":[1]}`, wantSkip: consumer.SkipBadPayload},
		{name: "envelope: empty array payload", value: `{"payload":[]}`, wantSkip: consumer.SkipBadPayload},
		{name: "envelope: string payload", value: `{"payload":"{}"}`, wantSkip: consumer.SkipBadPayload},
		{name: "envelope: number payload", value: `{"payload":1}`, wantSkip: consumer.SkipBadPayload},
		{name: "envelope: bool payload", value: `{"payload":false}`, wantSkip: consumer.SkipBadPayload},
		{name: "envelope: ts overflows a float64", value: `{"ts":1e400,"payload":{}}`, wantSkip: consumer.SkipBadTS},
		{name: "envelope: negative ts overflows a float64", value: `{"ts":-1e400,"payload":{}}`, wantSkip: consumer.SkipBadTS},
		{name: "envelope: ts a string", value: `{"ts":"1750000000","payload":{}}`, wantSkip: consumer.SkipBadTS},
		{name: "envelope: ts a bool", value: `{"ts":true,"payload":{}}`, wantSkip: consumer.SkipBadTS},
		{name: "envelope: ts an object", value: `{"ts":{},"payload":{}}`, wantSkip: consumer.SkipBadTS},
		{name: "envelope: type a number", value: `{"type":5,"payload":{}}`, wantSkip: consumer.SkipBadType},
		{name: "envelope: type an object", value: `{"type":{"a":1},"payload":{}}`, wantSkip: consumer.SkipBadType},
		{name: "envelope: type an array", value: `{"type":["formed"],"payload":{}}`, wantSkip: consumer.SkipBadType},

		// Bare payloads.
		{
			name:  "bare payload: itself the payload, type = event name, ts = record timestamp",
			value: `{"identity_uuid":"a","observation_uuids":["o1"]}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{"identity_uuid":"a","observation_uuids":["o1"]}}`),
		},
		{
			name:  "bare payload: its own type and ts keys are payload, not envelope",
			value: `{"type":"other","ts":5,"identity_uuid":"a"}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{"type":"other","ts":5,"identity_uuid":"a"}}`),
		},
		{
			name:  "bare payload: bad type and ts keys do not skip it",
			value: `{"type":5,"ts":1e400}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{"type":5,"ts":1e400}}`),
		},
		{
			name:  "bare payload: empty object, surrounded by whitespace",
			value: " \r\n\t{ }\n",
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{}}`),
		},

		// Record timestamps as epoch seconds.
		{
			name:  "record timestamp on a whole second",
			ts:    time.UnixMilli(1750000000000),
			value: `{}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000,"payload":{}}`),
		},
		{
			name:  "record timestamp with a trailing zero millisecond",
			ts:    time.UnixMilli(1750000000100),
			value: `{}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.1,"payload":{}}`),
		},
		{
			name:  "record timestamp with sub-millisecond part",
			ts:    time.Unix(1750000000, 999_999_999),
			value: `{}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.999,"payload":{}}`),
		},

		// Values that are not JSON objects.
		{name: "not JSON", value: `identity formed`, wantSkip: consumer.SkipNotJSON},
		{name: "truncated JSON", value: `{"payload":{"identity_uuid":"a"}`, wantSkip: consumer.SkipNotJSON},
		{name: "two JSON values", value: `{}{}`, wantSkip: consumer.SkipNotJSON},
		{name: "empty value", value: ``, wantSkip: consumer.SkipNotJSON},
		{name: "whitespace only", value: " \n", wantSkip: consumer.SkipNotJSON},
		{name: "raw newline inside a string", value: "{\"identity_uuid\":\"a\n\ndata: x\"}", wantSkip: consumer.SkipNotJSON},
		{name: "byte order mark", value: "\uFEFF{}", wantSkip: consumer.SkipNotJSON},
		{name: "JSON array", value: `[{"payload":{}}]`, wantSkip: consumer.SkipNotObject},
		{name: "JSON string", value: `"formed"`, wantSkip: consumer.SkipNotObject},
		{name: "JSON number", value: `1750000000`, wantSkip: consumer.SkipNotObject},
		{name: "JSON bool", value: `true`, wantSkip: consumer.SkipNotObject},
		{name: "JSON null", value: `null`, wantSkip: consumer.SkipNotObject},
		{name: "JSON null with whitespace", value: " null ", wantSkip: consumer.SkipNotObject},
		{name: "invalid UTF-8 in a string", value: "{\"identity_uuid\":\"\xff\"}", wantSkip: consumer.SkipInvalidUTF8},
		{name: "truncated UTF-8 sequence", value: "{\"notes\":\"\xc3\"}", wantSkip: consumer.SkipInvalidUTF8},
		{name: "over the size limit", value: `{"identity_uuid":"abcdefgh"}`, maxBytes: 27, wantSkip: consumer.SkipTooLarge},
		{
			name:     "exactly the size limit",
			value:    `{"identity_uuid":"abcdefgh"}`,
			maxBytes: 28,
			want:     frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{"identity_uuid":"abcdefgh"}}`),
		},
		{name: "too large wins over not JSON", value: `not json at all`, maxBytes: 4, wantSkip: consumer.SkipTooLarge},

		// Payload strings that would break the framing if written raw.
		{
			name:  "escaped newlines, CR and a fake data line stay escaped",
			value: `{"type":"formed","ts":1,"payload":{"identity_uuid":"a\n\ndata: x","notes":"\r","more":"\r\n\nevent: merged"}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1,"payload":{"identity_uuid":"a\n\ndata: x","notes":"\r","more":"\r\n\nevent: merged"}}`),
		},
		{
			name:  "other control characters, NEL and line separators",
			value: `{"payload":{"c":"\u0000\u0001\u001f\u007f\u0085\u2028\u2029\t\b\f","raw":"` + "\u0085\u2028\u2029\u007f" + `"}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1750000000.123,"payload":{"c":"\u0000\u0001\u001f\u007f\u0085\u2028\u2029\t\b\f","raw":"`+"\u0085\u2028\u2029\u007f"+`"}}`),
		},
		{
			name:  "control characters in the type are escaped",
			value: `{"type":"a\r\nb\u0000","payload":{}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"a\r\nb\u0000","ts":1750000000.123,"payload":{}}`),
		},
		{
			name:  "HTML and non-ASCII pass unescaped",
			value: `{"type":"<b>&","payload":{"notes":"<script>&amp;</script>","name":"é😀"}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"<b>&","ts":1750000000.123,"payload":{"notes":"<script>&amp;</script>","name":"é😀"}}`),
		},

		// Event names from topics, and the keys browsers match on.
		{
			name:  "identity.formed",
			value: `{"type":"formed","ts":1,"payload":{"identity_uuid":"i1","observation_uuids":["o1","o2"]}}`,
			want:  frame("formed", `{"topic":"identity.formed","type":"formed","ts":1,"payload":{"identity_uuid":"i1","observation_uuids":["o1","o2"]}}`),
		},
		{
			name:  "identity.observation.linked",
			topic: "identity.observation.linked",
			value: `{"type":"observation.linked","ts":1,"payload":{"identity_uuid":"i1","observation_uuid":"o1"}}`,
			want:  frame("observation.linked", `{"topic":"identity.observation.linked","type":"observation.linked","ts":1,"payload":{"identity_uuid":"i1","observation_uuid":"o1"}}`),
		},
		{
			name:  "identity.merged",
			topic: "identity.merged",
			value: `{"type":"merged","ts":1,"payload":{"winner_uuid":"w","loser_uuid":"l"}}`,
			want:  frame("merged", `{"topic":"identity.merged","type":"merged","ts":1,"payload":{"winner_uuid":"w","loser_uuid":"l"}}`),
		},
		{
			name:  "identity.unmerged",
			topic: "identity.unmerged",
			value: `{"type":"unmerged","ts":1,"payload":{"resurrected_uuid":"r","former_winner_uuid":"f"}}`,
			want:  frame("unmerged", `{"topic":"identity.unmerged","type":"unmerged","ts":1,"payload":{"resurrected_uuid":"r","former_winner_uuid":"f"}}`),
		},
		{
			name:  "identity.campaign.assigned",
			topic: "identity.campaign.assigned",
			value: `{"type":"campaign.assigned","ts":1,"payload":{"identity_uuid":"i1","campaign_uuid":"c2","prior_campaign_uuid":null}}`,
			want:  frame("campaign.assigned", `{"topic":"identity.campaign.assigned","type":"campaign.assigned","ts":1,"payload":{"identity_uuid":"i1","campaign_uuid":"c2","prior_campaign_uuid":null}}`),
		},
		{
			name:  "bare campaign.assigned with a prior campaign",
			topic: "identity.campaign.assigned",
			value: `{"identity_uuid":"i1","campaign_uuid":"c2","prior_campaign_uuid":"c1"}`,
			want:  frame("campaign.assigned", `{"topic":"identity.campaign.assigned","type":"campaign.assigned","ts":1750000000.123,"payload":{"identity_uuid":"i1","campaign_uuid":"c2","prior_campaign_uuid":"c1"}}`),
		},
		{
			name:  "foreign topic passes whole",
			topic: "other.topic",
			value: `{"identity_uuid":"i1"}`,
			want:  frame("other.topic", `{"topic":"other.topic","type":"other.topic","ts":1750000000.123,"payload":{"identity_uuid":"i1"}}`),
		},
		{
			name:  "bare prefix passes whole",
			topic: "identity.",
			value: `{}`,
			want:  frame("identity.", `{"topic":"identity.","type":"identity.","ts":1750000000.123,"payload":{}}`),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			topic := tt.topic
			if topic == "" {
				topic = "identity.formed"
			}
			ts := tt.ts
			if ts.IsZero() {
				ts = recordTS
			}
			maxBytes := tt.maxBytes
			if maxBytes == 0 {
				maxBytes = testMaxBytes
			}
			got, err := decodeFrame(t, topic, ts, tt.value, maxBytes)
			if tt.wantSkip != "" {
				checkSkip(t, err, tt.wantSkip)
				return
			}
			if err != nil {
				t.Fatalf("Decode(%q): %v", tt.value, err)
			}
			if got != tt.want {
				t.Fatalf("frame\n got %q\nwant %q", got, tt.want)
			}
			if _, err := ssetest.ParseEvent([]byte(got)); err != nil {
				t.Fatalf("frame is not one event line and one data line: %v", err)
			}
		})
	}
}

// checkSkip asserts that err is a *SkipError with the given reason.
func checkSkip(t *testing.T, err error, reason string) {
	t.Helper()
	var se *consumer.SkipError
	if !errors.As(err, &se) {
		t.Fatalf("error = %v (%T), want a *SkipError with reason %q", err, err, reason)
	}
	if se.Reason != reason {
		t.Fatalf("skip reason = %q (%v), want %q", se.Reason, se, reason)
	}
	if !strings.Contains(se.Error(), reason) {
		t.Fatalf("Error() = %q does not name the reason %q", se.Error(), reason)
	}
}

// TestDecodeNoLimit guards that maxBytes <= 0 means no size limit.
func TestDecodeNoLimit(t *testing.T) {
	big := `{"notes":"` + strings.Repeat("x", 1<<20) + `"}`
	for _, maxBytes := range []int{0, -1} {
		t.Run("maxBytes="+strconv.Itoa(maxBytes), func(t *testing.T) {
			ev, err := consumer.Decode("identity.formed", recordTS, []byte(big), maxBytes)
			if err != nil {
				t.Fatalf("Decode of a 1 MiB value with maxBytes %d: %v", maxBytes, err)
			}
			if string(ev.Payload) != big {
				t.Fatalf("payload of %d bytes, want the %d-byte value", len(ev.Payload), len(big))
			}
		})
	}
}
