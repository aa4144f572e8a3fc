package ssetest

import (
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

// TestParseFrames guards the parser's reading of valid streams: comments,
// the four fields, one optional space after the colon, exact raw bytes.
func TestParseFrames(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []Frame
	}{
		{name: "empty stream", in: "", want: nil},
		{
			name: "keepalive then event",
			in:   ": keepalive\n\nevent: formed\ndata: {\"a\":1}\n\n",
			want: []Frame{
				{Comments: []string{" keepalive"}, Raw: []byte(": keepalive\n\n")},
				{Event: "formed", Data: []string{`{"a":1}`}, Raw: []byte("event: formed\ndata: {\"a\":1}\n\n")},
			},
		},
		{
			name: "no space after colon, two data lines, id and retry",
			in:   "event:x\ndata:a\ndata:  b\nid: 7\nretry: 1000\n\n",
			want: []Frame{{
				Event: "x", Data: []string{"a", " b"}, ID: "7", HasID: true, Retry: "1000", HasRetry: true,
				Raw: []byte("event:x\ndata:a\ndata:  b\nid: 7\nretry: 1000\n\n"),
			}},
		},
		{
			name: "field without colon has an empty value",
			in:   "data\n\n",
			want: []Frame{{Data: []string{""}, Raw: []byte("data\n\n")}},
		},
		{
			name: "value keeps colons and NUL",
			in:   "event: a:b\ndata: x\x00y\n\n",
			want: []Frame{{Event: "a:b", Data: []string{"x\x00y"}, Raw: []byte("event: a:b\ndata: x\x00y\n\n")}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseFrames([]byte(tt.in))
			if err != nil {
				t.Fatalf("ParseFrames(%q): %v", tt.in, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("ParseFrames(%q)\n got %#v\nwant %#v", tt.in, got, tt.want)
			}
		})
	}
}

// TestParseFramesRejects guards the strictness: every input a browser would
// read differently from what the sender meant is an error.
func TestParseFramesRejects(t *testing.T) {
	tests := []struct {
		name, in, wantErr string
	}{
		{"unterminated final frame", "event: a\ndata: x\n", "ends inside a frame"},
		{"unterminated final line", "event: a\ndata: x", "ends inside a frame"},
		{"frame ended by one newline only", ": keepalive\n", "ends inside a frame"},
		{"CR in data", "event: a\ndata: x\ry\n\n", "carriage return"},
		{"CRLF line ends", "event: a\r\ndata: x\r\n\r\n", "carriage return"},
		{"unknown field", "event: a\ndata: x\nfoo: y\n\n", `unknown field "foo"`},
		{"field name with space", "event: a\n data: x\n\n", `unknown field " data"`},
		{"two event fields", "event: a\nevent: b\ndata: x\n\n", "second event field"},
		{"empty event name", "event: \ndata: x\n\n", "empty event name"},
		{"two ids", "id: 1\nid: 2\ndata: x\n\n", "second id"},
		{"id with NUL", "id: 1\x002\ndata: x\n\n", "NUL"},
		{"retry not digits", "retry: 1s\ndata: x\n\n", "not ASCII digits"},
		{"blank line ending no frame", "data: x\n\n\n", "blank line that ends no frame"},
		{"leading blank line", "\ndata: x\n\n", "blank line that ends no frame"},
		{"invalid UTF-8", "data: \xff\n\n", "invalid UTF-8"},
		{"byte order mark", "\uFEFFdata: x\n\n", "byte order mark"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseFrames([]byte(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ParseFrames(%q) error = %v, want one containing %q", tt.in, err, tt.wantErr)
			}
		})
	}
}

// TestReaderNext guards the incremental reader: frames one by one, io.EOF
// between frames, ErrUnterminated inside one.
func TestReaderNext(t *testing.T) {
	tests := []struct {
		name       string
		in         string
		wantEvents []string
		wantErr    error
	}{
		{"clean end", ": k\n\nevent: a\ndata: 1\n\nevent: b\ndata: 2\n\n", []string{"", "a", "b"}, io.EOF},
		{"cut inside a frame", ": k\n\nevent: a\ndata: 1\n", []string{""}, ErrUnterminated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := NewReader(strings.NewReader(tt.in))
			var events []string
			for {
				f, err := r.Next()
				if err != nil {
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("Next error = %v, want %v", err, tt.wantErr)
					}
					break
				}
				events = append(events, f.Event)
			}
			if !reflect.DeepEqual(events, tt.wantEvents) {
				t.Fatalf("events = %q, want %q", events, tt.wantEvents)
			}
		})
	}
}

// TestFrameHelpers guards IsComment and DataString.
func TestFrameHelpers(t *testing.T) {
	tests := []struct {
		name        string
		f           Frame
		wantComment bool
		wantData    string
	}{
		{"comment", Frame{Comments: []string{" keepalive"}}, true, ""},
		{"event with comment", Frame{Comments: []string{"x"}, Event: "a", Data: []string{"1"}}, false, "1"},
		{"multi-line data", Frame{Data: []string{"a", "b"}}, false, "a\nb"},
		{"empty", Frame{}, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.f.IsComment(); got != tt.wantComment {
				t.Errorf("IsComment = %v, want %v", got, tt.wantComment)
			}
			if got := tt.f.DataString(); got != tt.wantData {
				t.Errorf("DataString = %q, want %q", got, tt.wantData)
			}
		})
	}
}

// TestParseEvent guards the check of the relay's event frame layout.
func TestParseEvent(t *testing.T) {
	tests := []struct {
		name, in, wantEvent, wantData, wantErr string
	}{
		{name: "relay frame", in: "event: formed\ndata: {}\n\n", wantEvent: "formed", wantData: "{}"},
		{name: "name with leading space", in: "event:  x\ndata: 1\n\n", wantEvent: " x", wantData: "1"},
		{name: "data before event", in: "data: {}\nevent: formed\n\n", wantErr: "layout"},
		{name: "no space after colon", in: "event:formed\ndata:{}\n\n", wantErr: "layout"},
		{name: "two data lines", in: "event: a\ndata: 1\ndata: 2\n\n", wantErr: "not one event line"},
		{name: "no event", in: "data: 1\n\n", wantErr: "not one event line"},
		{name: "with comment", in: ": c\nevent: a\ndata: 1\n\n", wantErr: "not one event line"},
		{name: "with id first", in: "id: 7\nevent: a\ndata: 1\n\n", wantEvent: "a", wantData: "1"},
		{name: "with id last", in: "event: a\ndata: 1\nid: 2\n\n", wantErr: "layout"},
		{name: "with retry", in: "retry: 5\nevent: a\ndata: 1\n\n", wantErr: "not one event line"},
		{name: "two frames", in: "event: a\ndata: 1\n\nevent: b\ndata: 2\n\n", wantErr: "2 frames"},
		{name: "no frame", in: "", wantErr: "0 frames"},
		{name: "injected CR", in: "event: a\ndata: 1\rdata: 2\n\n", wantErr: "carriage return"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := ParseEvent([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseEvent(%q) error = %v, want one containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseEvent(%q): %v", tt.in, err)
			}
			if f.Event != tt.wantEvent || f.DataString() != tt.wantData {
				t.Fatalf("ParseEvent(%q) = event %q data %q, want %q %q", tt.in, f.Event, f.DataString(), tt.wantEvent, tt.wantData)
			}
		})
	}
}
