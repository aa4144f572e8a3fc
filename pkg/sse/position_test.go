package sse

import (
	"errors"
	"fmt"
	"maps"
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

// Every id Encode can make within MaxPartitions and MaxOffset is one
// ParsePosition reads back: the longest fits MaxPositionLen, and one slot
// more is refused.
func TestPositionLimitsAgree(t *testing.T) {
	worst := Position{}
	for i := range MaxPartitions { // one slot per topic: the most bytes
		worst[Key{Topic: uint32(i), Partition: 0}] = MaxOffset
	}
	id := worst.Encode()
	if len(id) > MaxPositionLen {
		t.Fatalf("id of %d bytes, longer than MaxPositionLen %d", len(id), MaxPositionLen)
	}
	if back, err := ParsePosition(id); err != nil || len(back) != MaxPartitions {
		t.Fatalf("the longest id: %d partitions back, %v", len(back), err)
	}
	over := Position{Key{Topic: 1, Partition: MaxPartitions}: 1} // slots 0..MaxPartitions
	if _, err := ParsePosition(over.Encode()); !errors.Is(err, ErrBadPosition) {
		t.Fatalf("%d slots: %v, want ErrBadPosition", MaxPartitions+1, err)
	}

}

// FuzzParsePosition: any input is a position or ErrBadPosition, never a
// panic; a position read re-encodes to one that reads back the same.
func FuzzParsePosition(f *testing.F) {
	f.Add("AQ")
	f.Add(Position{KeyOf("identity.formed", [16]byte{}, 0): 5, KeyOf("identity.merged", [16]byte{1}, 3): 1 << 40}.Encode())
	f.Add("garbage!")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParsePosition(s)
		if err != nil {
			if !errors.Is(err, ErrBadPosition) {
				t.Fatalf("error %v, want ErrBadPosition", err)
			}
			return
		}
		id := p.Encode()
		if len(id) > MaxPositionLen {
			t.Fatalf("re-encoded to %d bytes", len(id))
		}
		back, err := ParsePosition(id)
		if err != nil || !maps.Equal(back, p) {
			t.Fatalf("%v re-encoded to %q, read back %v, %v", p, id, back, err)
		}
	})
}
