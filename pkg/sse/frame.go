// Package sse is the relay's wire format: the events browsers see, their
// encoding as Server-Sent Events frames, and the stream positions that are
// the frames' ids. It imports nothing of the relay's.
package sse

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"unicode/utf8"
)

// Sentinel errors of Encode.
var (
	// ErrNotUTF8 is returned for a type, ts or payload that is not UTF-8: an
	// SSE stream is UTF-8, so a browser would read other text than the bytes
	// sent, and encoding/json would silently replace them in the type.
	ErrNotUTF8 = errors.New("sse: event is not UTF-8")
	// ErrBadName is returned for a topic that cannot name an SSE event.
	ErrBadName = errors.New("sse: topic cannot be an SSE event name")
	// ErrBadID is returned for an id holding CR, LF or NUL.
	ErrBadID = errors.New("sse: id cannot be an SSE id")
)

// TopicPrefix is stripped from a topic to name its SSE event:
// identity.observation.linked → observation.linked.
const TopicPrefix = "identity."

// Event is one identity event as the browsers see it (CONTRACT.md, "Output").
type Event struct {
	Topic string
	Type  string
	// TS is a JSON number literal, epoch seconds, kept as text so the
	// publisher's value passes through digit for digit.
	TS string
	// Payload is a JSON object; Encode compacts it.
	Payload json.RawMessage

	// TopicID, Partition and Offset place the record in Kafka; they make the frame's id.
	TopicID   [16]byte
	Partition int32
	Offset    int64
	// Backfill marks a record read at start-up to fill the replay window (it
	// lay below its partition's end offset then): kept for resumes, not broadcast.
	Backfill bool
}

// Frame is one encoded SSE frame, built once and shared by every viewer.
// Nobody may modify Bytes after Encode returns.
type Frame struct {
	Bytes  []byte
	Key    Key   // the partition of the record
	Offset int64 // the record's offset
	head   int   // length of the "id: ...\n" line at the start of Bytes
}

// ID is the frame's id, as Encode wrote it.
func (f *Frame) ID() string {
	if f.head == 0 {
		return ""
	}
	return string(f.Bytes[len("id: ") : f.head-1])
}

// WithID returns a copy of the frame's bytes with id in place of its own.
func (f *Frame) WithID(id string) []byte {
	body := f.Bytes[f.head:]
	b := make([]byte, 0, len("id: \n")+len(id)+len(body))
	b = append(b, "id: "...)
	b = append(b, id...)
	b = append(b, '\n')
	return append(b, body...)
}

// EventName derives the SSE event name from a topic: the topic without the
// leading "identity.", or the whole topic when it lacks that prefix.
func EventName(topic string) string {
	if name, ok := strings.CutPrefix(topic, TopicPrefix); ok && name != "" {
		return name
	}
	return topic
}

// Encode builds the frame `id: <id>\nevent: <name>\ndata: <json>\n\n`, without
// the id line when id is empty. The data is the compact JSON
// {"topic","type","ts","payload"}; compact JSON holds no raw CR or LF, so the
// frame cannot break the SSE framing of the stream. Every part must be UTF-8
// (ErrBadName for the topic, ErrBadID for the id, ErrNotUTF8 for the rest).
func Encode(ev Event, id string) (*Frame, error) {
	name := EventName(ev.Topic)
	if name == "" || strings.ContainsAny(name, "\r\n") || !utf8.ValidString(name) {
		return nil, ErrBadName
	}
	if !utf8.ValidString(ev.Type) || !utf8.ValidString(ev.TS) || !utf8.Valid(ev.Payload) {
		return nil, ErrNotUTF8
	}
	if strings.ContainsAny(id, "\r\n\x00") || !utf8.ValidString(id) {
		return nil, ErrBadID
	}
	var b bytes.Buffer
	b.Grow(64 + len(id) + len(ev.Topic)*2 + len(ev.Type) + len(ev.TS) + len(ev.Payload))
	if id != "" {
		b.WriteString("id: ")
		b.WriteString(id)
		b.WriteByte('\n')
	}
	head := b.Len()
	b.WriteString("event: ")
	b.WriteString(name)
	b.WriteString("\ndata: {\"topic\":")
	if err := writeString(&b, ev.Topic); err != nil {
		return nil, err
	}
	b.WriteString(`,"type":`)
	if err := writeString(&b, ev.Type); err != nil {
		return nil, err
	}
	b.WriteString(`,"ts":`)
	if err := json.Compact(&b, []byte(ev.TS)); err != nil {
		return nil, err
	}
	b.WriteString(`,"payload":`)
	if err := json.Compact(&b, ev.Payload); err != nil {
		return nil, err
	}
	b.WriteString("}\n\n")
	return &Frame{Bytes: b.Bytes(), head: head}, nil
}

// writeString appends s as a JSON string without HTML escaping, as the
// original Python handler (orjson) did.
func writeString(b *bytes.Buffer, s string) error {
	enc := json.NewEncoder(b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s); err != nil {
		return err
	}
	b.Truncate(b.Len() - 1) // Encode appends a newline.
	return nil
}
