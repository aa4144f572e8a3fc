// Package ssetest is a strict parser of text/event-stream for tests. It
// accepts what the SSE specification accepts only where the relay has no
// reason to send anything else, and reports as an error whatever a browser
// would read differently from what the relay meant: a CR anywhere (a line
// break to a browser), invalid UTF-8, an unknown field, an event, id or retry
// field given twice in one frame, an empty event name, a blank line that ends
// no frame, and a final frame without its terminating blank line.
package ssetest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

// Frame is one block of lines ended by a blank line.
type Frame struct {
	// Comments holds the text after the ':' of each comment line, in order.
	Comments []string
	// Event is the event field's value; "" when the frame has none.
	Event string
	// Data holds the value of each data line, in order.
	Data []string
	// ID and Retry are the values of those fields; HasID and HasRetry say
	// whether the frame had them.
	ID, Retry       string
	HasID, HasRetry bool
	// Raw is the frame's exact bytes, the terminating blank line included.
	Raw []byte
}

// IsComment reports whether the frame holds comment lines only, like the
// relay's ": keepalive\n\n".
func (f Frame) IsComment() bool {
	return len(f.Comments) > 0 && f.Event == "" && len(f.Data) == 0 && !f.HasID && !f.HasRetry
}

// DataString joins the data lines as a browser does (MessageEvent.data).
func (f Frame) DataString() string { return strings.Join(f.Data, "\n") }

// ErrUnterminated is returned when the input ends inside a frame.
var ErrUnterminated = errors.New("ssetest: stream ends inside a frame (no blank line after it)")

// ParseFrames parses a whole stream: b must end exactly at the end of a frame.
func ParseFrames(b []byte) ([]Frame, error) {
	r := NewReader(bytes.NewReader(b))
	var frames []Frame
	for {
		f, err := r.Next()
		if errors.Is(err, io.EOF) {
			return frames, nil
		}
		if err != nil {
			return frames, err
		}
		frames = append(frames, f)
	}
}

// ParseEvent parses b as exactly one event frame in the relay's shape,
// "id: <id>\nevent: <name>\ndata: <data>\n\n" and nothing else: an optional
// id line, one event line, one data line, then the blank line; no comment
// and no retry.
func ParseEvent(b []byte) (Frame, error) {
	frames, err := ParseFrames(b)
	if err != nil {
		return Frame{}, err
	}
	if len(frames) != 1 {
		return Frame{}, fmt.Errorf("ssetest: %d frames, want 1", len(frames))
	}
	f := frames[0]
	if f.Event == "" || len(f.Data) != 1 || len(f.Comments) != 0 || f.HasRetry {
		return f, fmt.Errorf("ssetest: frame is not one event line and one data line: %q", f.Raw)
	}
	want := "event: " + f.Event + "\ndata: " + f.Data[0] + "\n\n"
	if f.HasID {
		want = "id: " + f.ID + "\n" + want
	}
	if string(f.Raw) != want {
		return f, fmt.Errorf("ssetest: frame %q, want the layout %q", f.Raw, want)
	}
	return f, nil
}

// Reader reads frames one at a time from a live stream.
type Reader struct {
	br    *bufio.Reader
	line  int // number of the next line, from 1
	start bool
}

// NewReader returns a Reader of r.
func NewReader(r io.Reader) *Reader { return &Reader{br: bufio.NewReader(r), line: 1, start: true} }

// Next returns the next frame. It returns io.EOF when the stream ends between
// frames and ErrUnterminated (wrapped) when it ends inside one.
func (r *Reader) Next() (Frame, error) {
	var f Frame
	var raw bytes.Buffer
	for {
		line, err := r.br.ReadBytes('\n')
		if err != nil {
			if !errors.Is(err, io.EOF) {
				return f, err
			}
			if raw.Len() == 0 && len(line) == 0 {
				return f, io.EOF
			}
			return f, fmt.Errorf("line %d: %w", r.line, ErrUnterminated)
		}
		raw.Write(line)
		n := r.line
		r.line++
		text := line[:len(line)-1]
		if r.start {
			r.start = false
			if bytes.HasPrefix(text, []byte("\uFEFF")) {
				return f, fmt.Errorf("line %d: byte order mark at the start of the stream", n)
			}
		}
		if bytes.IndexByte(text, '\r') >= 0 {
			return f, fmt.Errorf("line %d: carriage return (a browser breaks the line there): %q", n, text)
		}
		if !utf8.Valid(text) {
			return f, fmt.Errorf("line %d: invalid UTF-8: %q", n, text)
		}
		if len(text) == 0 {
			if raw.Len() == 1 {
				return f, fmt.Errorf("line %d: blank line that ends no frame", n)
			}
			f.Raw = raw.Bytes()
			return f, nil
		}
		if err := f.addLine(string(text)); err != nil {
			return f, fmt.Errorf("line %d: %w", n, err)
		}
	}
}

// addLine applies one non-blank line to f as the SSE specification reads it:
// "name:value" with one leading space of the value dropped; a line without a
// colon is a field with an empty value.
func (f *Frame) addLine(line string) error {
	if c, ok := strings.CutPrefix(line, ":"); ok {
		f.Comments = append(f.Comments, c)
		return nil
	}
	name, value, _ := strings.Cut(line, ":")
	value = strings.TrimPrefix(value, " ")
	switch name {
	case "event":
		if f.Event != "" {
			return fmt.Errorf("second event field %q (first %q)", value, f.Event)
		}
		if value == "" {
			return errors.New("empty event name (a browser dispatches it as \"message\")")
		}
		f.Event = value
	case "data":
		f.Data = append(f.Data, value)
	case "id":
		if f.HasID {
			return errors.New("second id field")
		}
		if strings.ContainsRune(value, 0) {
			return errors.New("id holds NUL (a browser ignores it)")
		}
		f.ID, f.HasID = value, true
	case "retry":
		if f.HasRetry {
			return errors.New("second retry field")
		}
		if value == "" || strings.Trim(value, "0123456789") != "" {
			return fmt.Errorf("retry %q is not ASCII digits (a browser ignores it)", value)
		}
		f.Retry, f.HasRetry = value, true
	default:
		return fmt.Errorf("unknown field %q", name)
	}
	return nil
}

// SameJSON reports whether a and b hold the same JSON value, numbers
// compared as written (1.0 and 1 differ, as they do to a browser that shows
// them); it fails t when either is not JSON.
func SameJSON(t testing.TB, a, b []byte) bool {
	t.Helper()
	decode := func(raw []byte) any {
		t.Helper()
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.UseNumber()
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("not JSON: %q: %v", raw, err)
		}
		return v
	}
	return reflect.DeepEqual(decode(a), decode(b))
}
