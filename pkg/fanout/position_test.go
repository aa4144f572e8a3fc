package fanout

import (
	"errors"
	"fmt"
	"testing"
)

// Positions survive an encode/parse round trip, and an id for 5 topics of 6
// partitions stays small (its size is reported for BENCHMARKS.md / README).
func TestPositionRoundTripAndSize(t *testing.T) {
	cases := []struct {
		name   string
		offset int64
		maxLen int
	}{
		{"offsets below 128", 100, 80},
		{"offsets near a million", 1_000_000, 160},
		{"offsets near 2^40", 1 << 40, 280},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := Position{}
			for topic := range 5 {
				for part := range int32(6) {
					p[KeyOf(fmt.Sprintf("identity.topic%d", topic), [16]byte{}, part)] = c.offset + int64(part)
				}
			}
			id := p.Encode()
			t.Logf("5 topics x 6 partitions, %s: id of %d bytes", c.name, len(id))
			if len(id) > c.maxLen {
				t.Fatalf("id of %d bytes, want at most %d", len(id), c.maxLen)
			}
			back, err := ParsePosition(id)
			if err != nil {
				t.Fatal(err)
			}
			if len(back) != len(p) {
				t.Fatalf("%d partitions back, want %d", len(back), len(p))
			}
			for k, v := range p {
				if back[k] != v {
					t.Fatalf("%v: %d back, want %d", k, back[k], v)
				}
			}
		})
	}
}

// Anything the relay did not make is ErrBadPosition, never a panic.
func TestParsePositionRejectsGarbage(t *testing.T) {
	long := make([]byte, MaxPositionLen+1)
	for i := range long {
		long[i] = 'A'
	}
	for _, s := range []string{"", "garbage!", "AA", "Ag", "AQAAAA", string(long), "AQAAAAH_____________8B"} {
		if _, err := ParsePosition(s); !errors.Is(err, ErrBadPosition) {
			t.Errorf("ParsePosition(%q) = %v, want ErrBadPosition", s, err)
		}
	}
}

// A position with gaps in its partitions encodes the missing ones as 0 (nothing seen).
func TestPositionSparsePartitions(t *testing.T) {
	k := func(p int32) Key { return KeyOf("identity.formed", [16]byte{}, p) }
	p := Position{k(0): 5, k(3): 9}
	back, err := ParsePosition(p.Encode())
	if err != nil {
		t.Fatal(err)
	}
	if back[k(0)] != 5 || back[k(3)] != 9 || len(back) != 2 {
		t.Fatalf("back %v", back)
	}
}
