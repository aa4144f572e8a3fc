package sse

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"hash/fnv"
	"maps"
	"slices"
)

// Key names one Kafka partition. The topic is kept as a 32-bit FNV-1a hash of
// its name and its Kafka topic ID, so that ids stay small, every replica
// computes the same key, and a topic deleted and re-created under the same
// name (a new topic ID, offsets from 0 again) is a different stream.
type Key struct {
	Topic     uint32
	Partition int32
}

// KeyOf returns the key of a topic's partition. topicID is Kafka's topic ID
// (zero where the cluster does not report one, before Kafka 3.1).
func KeyOf(topic string, topicID [16]byte, partition int32) Key {
	return Key{Topic: topicHash(topic, topicID), Partition: partition}
}

func topicHash(topic string, topicID [16]byte) uint32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(topic))
	if topicID != ([16]byte{}) {
		_, _ = h.Write(topicID[:])
	}
	return h.Sum32()
}

// Position is a point in the stream: for each partition, the offset of the
// next record not yet seen. A partition that is absent is at offset 0.
type Position map[Key]int64

// Sentinel errors of positions.
var (
	// ErrBadPosition is returned by ParsePosition for an id the relay did not make.
	ErrBadPosition = errors.New("sse: not a stream position")
	// ErrTooManyPartitions is for a partition that would take a stream past
	// MaxPartitions: its ids could not be read back.
	ErrTooManyPartitions = errors.New("sse: too many partitions for a stream position")
)

const (
	positionVersion = 1
	// MaxPartitions bounds the partition slots of a position: for each topic,
	// its highest partition number seen plus one, summed over topics.
	MaxPartitions = 1024
	// MaxOffset bounds an offset in a position (Kafka's never come near it).
	MaxOffset = 1 << 62
	// maxBinary is the longest position Encode can make within those limits:
	// the version byte, then per topic its 4-byte hash and a 1-byte count
	// (the most topics come with one slot each), and 9 bytes per offset.
	maxBinary = 1 + MaxPartitions*(4+1) + MaxPartitions*9
	// MaxPositionLen is the longest id Encode makes, and the longest that
	// ParsePosition reads: base64 of maxBinary bytes.
	MaxPositionLen = (maxBinary*8 + 5) / 6
)

// Slots is the number of partition slots Encode writes for p: see MaxPartitions.
func (p Position) Slots() int {
	counts := map[uint32]int32{}
	for k := range p {
		counts[k.Topic] = max(counts[k.Topic], k.Partition+1)
	}
	n := 0
	for _, c := range counts {
		n += int(c)
	}
	return n
}

// Encode renders the position as an SSE id: base64url of a version byte, then
// per topic (by hash, ascending): the 4-byte hash, the partition count n as a
// uvarint, and n uvarint offsets for partitions 0..n-1 (0 for one never seen,
// which means exactly that: nothing of it seen).
func (p Position) Encode() string {
	return base64.RawURLEncoding.EncodeToString(p.appendBinary(nil))
}

func (p Position) appendBinary(b []byte) []byte {
	counts := map[uint32]int32{}
	for k := range p {
		counts[k.Topic] = max(counts[k.Topic], k.Partition+1)
	}
	topics := slices.Sorted(maps.Keys(counts))
	b = append(b, positionVersion)
	for _, t := range topics {
		b = binary.BigEndian.AppendUint32(b, t)
		b = binary.AppendUvarint(b, uint64(counts[t]))
		for part := range counts[t] {
			b = binary.AppendUvarint(b, uint64(p[Key{t, part}]))
		}
	}
	return b
}

// ParsePosition decodes an id made by Encode. It reads every id Encode makes
// within MaxPartitions and MaxOffset, and nothing longer.
func ParsePosition(s string) (Position, error) {
	if len(s) == 0 || len(s) > MaxPositionLen {
		return nil, ErrBadPosition
	}
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(b) == 0 || b[0] != positionVersion {
		return nil, ErrBadPosition
	}
	b = b[1:]
	p := Position{}
	slots := uint64(0)
	seen := map[uint32]bool{}
	for len(b) > 0 {
		if len(b) < 4 {
			return nil, ErrBadPosition
		}
		topic := binary.BigEndian.Uint32(b)
		b = b[4:]
		if seen[topic] {
			return nil, ErrBadPosition // Encode writes each topic once
		}
		seen[topic] = true
		n, w := binary.Uvarint(b)
		if w <= 0 || n == 0 || n > uint64(len(b)) { // each offset takes at least one byte
			return nil, ErrBadPosition
		}
		if slots += n; slots > MaxPartitions {
			return nil, ErrBadPosition
		}
		b = b[w:]
		for part := range int32(n) {
			off, w := binary.Uvarint(b)
			if w <= 0 || off > MaxOffset {
				return nil, ErrBadPosition
			}
			b = b[w:]
			if off > 0 {
				p[Key{topic, part}] = int64(off)
			}
		}
	}
	return p, nil
}

// Clone returns a copy of p.
func (p Position) Clone() Position { return maps.Clone(p) }
