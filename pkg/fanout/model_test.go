package fanout

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/decnet/identity-relay/pkg/sse"
)

// The resume machinery against a reference model. Several replicas read the
// same Kafka log, each in its own interleaving of partitions and with its own
// window size; some restart (back-filling their window, as the relay does at
// start-up). Viewers connect to random replicas, are dropped as slow or
// leave at random frames, and come back to a random replica with the last id
// they received, or an older id, or garbage. Kafka read-backs fail now and
// then, lose records to retention, and race with records published (and
// evicted) while they read.
//
// The invariant, per viewer and per frame sent: the record is the one that
// follows, in the Kafka log, what the viewer holds on its partition (so each
// record comes once, in order, none skipped); and the frame's id claims no
// record the viewer was not sent, and takes back none it was. What a viewer
// holds is the position it last resumed from, or the snapshot's.

// modelSeeds is how many schedules TestResumeModel runs (RELIABILITY.md quotes it).
const modelSeeds = 400

func TestResumeModel(t *testing.T) {
	viewers, frames, resumes := 0, 0, map[string]int{}
	for seed := range uint64(modelSeeds) {
		m := runModel(t, newChooser(nil, seed), 300)
		viewers, frames = viewers+len(m.viewers), frames+m.frames
		for k, n := range m.resumes {
			resumes[k] += n
		}
		if t.Failed() {
			t.Fatalf("seed %d failed", seed)
		}
	}
	t.Logf("%d schedules, %d viewers, %d frames checked; connects: %v", modelSeeds, viewers, frames, resumes)
}

// FuzzResumeModel explores schedules beyond the fixed seeds: the input
// drives every choice of the schedule.
func FuzzResumeModel(f *testing.F) {
	f.Add([]byte{0})
	f.Add([]byte("replicas hop and windows evict"))
	f.Fuzz(func(t *testing.T, choices []byte) {
		runModel(t, newChooser(choices, 0), 200)
	})
}

// chooser makes the schedule's choices: from the fuzzer's bytes while they
// last, then from a generator seeded by them.
type chooser struct {
	data []byte
	rng  *rand.Rand
}

func newChooser(data []byte, seed uint64) *chooser {
	h := fnv.New64a()
	_, _ = h.Write(data)
	return &chooser{data: data, rng: rand.New(rand.NewPCG(seed, h.Sum64()))}
}

// n returns a number in [0, n).
func (c *chooser) n(n int) int {
	if len(c.data) > 0 {
		b := c.data[0]
		c.data = c.data[1:]
		return int(b) % n
	}
	return c.rng.IntN(n)
}

func (c *chooser) chance(percent int) bool { return c.n(100) < percent }

// mpart is one partition of the model's Kafka log.
type mpart struct {
	topic string
	id    [16]byte
	part  int32
	key   sse.Key
	offs  []int64 // offsets of its records, increasing, with holes (markers, skipped records)
	start int     // records below offs[start] are gone (retention)
}

// after returns the offset of the first record at or after off.
func (p *mpart) after(off int64) (int64, bool) {
	for _, o := range p.offs {
		if o >= off {
			return o, true
		}
	}
	return 0, false
}

type mreplica struct {
	b    *Broadcaster
	read []int // per partition, records published
}

type mviewer struct {
	rep    *mreplica
	sub    *Subscription
	cursor *Cursor
	have   sse.Position // the model: what the viewer holds
	// floor, after a snapshot, holds per partition the offset below which
	// the snapshot covers what the replica skipped (records gone from Kafka
	// before it read them): the ids do not claim those, and need not.
	floor sse.Position
	ids   []string // ids received (the snapshot's too), oldest first
}

type model struct {
	t        *testing.T
	c        *chooser
	parts    []*mpart
	byKey    map[sse.Key]int
	replicas []*mreplica
	viewers  []*mviewer
	// during, if set, runs inside a Kafka read-back (the race with publishing).
	during func()
	// resumes counts how viewers came back: window, kafka, snapshot; frames
	// counts the frames checked.
	resumes map[string]int
	frames  int
}

func runModel(t *testing.T, c *chooser, steps int) *model {
	t.Helper()
	m := &model{t: t, c: c, byKey: map[sse.Key]int{}, resumes: map[string]int{}}
	for ti, topic := range []string{"identity.formed", "identity.merged"} {
		for p := range int32(1 + c.n(3)) {
			mp := &mpart{topic: topic, id: [16]byte{byte(ti + 1)}, part: p}
			mp.key = sse.KeyOf(topic, mp.id, p)
			m.byKey[mp.key] = len(m.parts)
			m.parts = append(m.parts, mp)
		}
	}
	for range 2 + c.n(2) {
		m.replicas = append(m.replicas, m.newReplica())
	}
	for range 2 + c.n(3) {
		m.viewers = append(m.viewers, &mviewer{})
	}
	defer func() {
		for _, r := range m.replicas {
			_ = r.b.Close()
		}
	}()
	for step := 0; step < steps && !t.Failed(); step++ {
		switch op := c.n(100); {
		case op < 25: // the producer writes a record, perhaps after a hole
			p := m.parts[c.n(len(m.parts))]
			next := int64(0)
			if n := len(p.offs); n > 0 {
				next = p.offs[n-1] + 1
			}
			if c.chance(20) {
				next += 1 + int64(c.n(3))
			}
			p.offs = append(p.offs, next)
		case op < 55: // a replica reads a record
			m.advance(m.replicas[c.n(len(m.replicas))], 1+c.n(3))
		case op < 80: // a viewer reads what is queued for it
			m.receive(m.viewers[c.n(len(m.viewers))])
		case op < 90: // a viewer leaves and comes back
			v := m.viewers[c.n(len(m.viewers))]
			if v.sub != nil {
				v.sub.Close()
				v.sub = nil
			}
			m.connect(v)
		case op < 93: // retention deletes old records, read by every replica long since
			i := c.n(len(m.parts))
			limit := len(m.parts[i].offs)
			for _, r := range m.replicas {
				limit = min(limit, r.read[i])
			}
			m.parts[i].start = max(m.parts[i].start, min(m.parts[i].start+1+c.n(3), limit))
		case op < 95: // a replica restarts (a rollout)
			i := c.n(len(m.replicas))
			old := m.replicas[i]
			_ = old.b.Close()
			m.replicas[i] = m.newReplica()
			for _, v := range m.viewers {
				if v.rep == old {
					m.receive(v) // the queued frames, then the end
				}
			}
		default:
			// nothing: viewers fall behind
		}
	}
	return m
}

func (m *model) newReplica() *mreplica {
	window := 2 + m.c.n(12)
	r := &mreplica{
		b:    New(Options{Buffer: 1 + m.c.n(12), WindowEvents: window, ReadBackBytes: 1 << 20}),
		read: make([]int, len(m.parts)),
	}
	// The start-up backfill: the last window records of each partition,
	// partitions interleaved, kept for resumes but not broadcast.
	for i, p := range m.parts {
		r.read[i] = max(len(p.offs)-window, p.start)
		if n := len(p.offs); n > 0 && p.start == n { // retention left nothing
			r.b.Empty(p.topic, p.id, p.part, p.offs[n-1]+1)
		}
	}
	for {
		var left []int
		for i, p := range m.parts {
			if r.read[i] < len(p.offs) {
				left = append(left, i)
			}
		}
		if len(left) == 0 {
			return r
		}
		m.publish(r, left[m.c.n(len(left))], true)
	}
}

// advance has r read up to n records, of partitions of its choice.
func (m *model) advance(r *mreplica, n int) {
	for range n {
		var left []int
		for i, p := range m.parts {
			if r.read[i] < len(p.offs) {
				left = append(left, i)
			}
		}
		if len(left) == 0 {
			return
		}
		m.publish(r, left[m.c.n(len(left))], false)
	}
}

func (m *model) event(pi int, off int64) sse.Event {
	p := m.parts[pi]
	return sse.Event{Topic: p.topic, TopicID: p.id, Partition: p.part, Offset: off, Type: "t", TS: "1",
		Payload: json.RawMessage(fmt.Sprintf(`{"k":%d,"o":%d}`, pi, off))}
}

func (m *model) publish(r *mreplica, pi int, backfill bool) {
	ev := m.event(pi, m.parts[pi].offs[r.read[pi]])
	ev.Backfill = backfill
	r.read[pi]++
	if err := r.b.Publish(ev); err != nil {
		m.t.Fatalf("publish: %v", err)
	}
}

// connect brings v back on a random replica: with its last id mostly, else
// an older one, garbage, or none.
func (m *model) connect(v *mviewer) {
	v.rep = m.replicas[m.c.n(len(m.replicas))]
	id := ""
	if n := len(v.ids); n > 0 {
		id = v.ids[n-1]
		switch m.c.n(10) {
		case 0:
			id = v.ids[m.c.n(n)]
		case 1:
			id = garbage(m.c, id)
		}
	}
	if from, err := sse.ParsePosition(id); err == nil {
		m.resume(v, from)
		return
	}
	m.snapshot(v)
}

// garbage mangles an id: cut short, a byte changed, or made up.
func garbage(c *chooser, id string) string {
	switch c.n(3) {
	case 0:
		return id[:c.n(len(id))]
	case 1:
		b := []byte(id)
		b[c.n(len(b))] = "AQ_-z9"[c.n(6)]
		return string(b)
	default:
		b := make([]byte, 1+c.n(40))
		for i := range b {
			b[i] = byte(c.n(256))
		}
		return string(b)
	}
}

func (m *model) resume(v *mviewer, from sse.Position) {
	// While Kafka is read, the replica may read on: the window evicts, and
	// new frames reach the subscription.
	if m.c.chance(50) {
		r := v.rep
		m.during = func() { m.advance(r, m.c.n(6)) }
	}
	sub, res, err := v.rep.b.Resume(context.Background(), from, modelHistory{m}, nil)
	m.during = nil
	if errors.Is(err, ErrUnusable) || errors.Is(err, ErrGap) {
		m.snapshot(v)
		return
	}
	if err != nil {
		m.t.Fatalf("resume: %v", err)
	}
	if len(res.Kafka) > 0 {
		m.resumes["kafka"]++
	} else {
		m.resumes["window"]++
	}
	v.sub, v.cursor, v.have, v.floor = sub, res.Cursor, from.Clone(), nil
	for _, f := range res.Kafka {
		m.check(v, f, "kafka")
	}
	for _, f := range res.Replay {
		m.send(v, f, "replay")
	}
}

// snapshot serves v as a new viewer: the snapshot is read at the replica's
// position then, and the frames published while it is read are replayed.
func (m *model) snapshot(v *mviewer) {
	m.resumes["snapshot"]++
	at := v.rep.b.Position()
	floor := sse.Position{}
	for i, p := range m.parts {
		if n := v.rep.read[i]; n > 0 && at[p.key] == 0 {
			floor[p.key] = p.offs[n-1] + 1
		}
	}
	m.advance(v.rep, m.c.n(2)) // the query takes a moment; windows hold 2 at least
	sub, replay, err := v.rep.b.Subscribe(at, nil)
	if err != nil {
		m.t.Fatalf("subscribe after a snapshot: %v", err)
	}
	v.sub, v.cursor, v.have, v.floor = sub, nil, at, floor
	if len(at) > 0 { // the snapshot frame's id (api's snapshotFrame)
		v.ids = append(v.ids, at.Encode())
	}
	for _, f := range replay {
		m.send(v, f, "snapshot replay")
	}
}

// receive takes what is queued for v; a subscription that ended is
// followed by a reconnect.
func (m *model) receive(v *mviewer) {
	if v.sub == nil {
		m.connect(v)
		return
	}
	for {
		select {
		case batch := <-v.sub.Batches():
			v.sub.Taken(batch)
			for _, f := range batch.Frames {
				m.send(v, f, "live")
			}
			continue
		default:
		}
		break
	}
	select {
	case <-v.sub.Done():
		v.sub = nil // dropped as slow, or its replica stopped
	default:
	}
}

func (m *model) send(v *mviewer, f *sse.Frame, what string) {
	out := v.cursor.Frame(f)
	if v.cursor.Done() {
		v.cursor = nil
	}
	if out != nil {
		m.check(v, out, what)
	}
}

// check applies the invariant to one frame sent to v, then records it.
func (m *model) check(v *mviewer, frame []byte, what string) {
	m.t.Helper()
	s := string(frame)
	idLine, rest, _ := strings.Cut(s, "\n")
	id, ok := strings.CutPrefix(idLine, "id: ")
	if !ok {
		m.t.Fatalf("%s frame without id: %q", what, s)
	}
	_, data, _ := strings.Cut(rest, "\ndata: ")
	var env struct{ Payload struct{ K, O int64 } }
	if err := json.Unmarshal([]byte(data), &env); err != nil {
		m.t.Fatalf("%s frame %q: %v", what, s, err)
	}
	p := m.parts[env.Payload.K]
	if want, ok := p.after(max(v.have[p.key], v.floor[p.key])); !ok || want != env.Payload.O {
		m.t.Fatalf("%s frame: %s/%d offset %d, but the viewer holds up to %d: want offset %d (%v)",
			what, p.topic, p.part, env.Payload.O, v.have[p.key], want, ok)
	}
	v.have[p.key] = env.Payload.O + 1
	pos, err := sse.ParsePosition(id)
	if err != nil {
		m.t.Fatalf("%s frame id %q: %v", what, id, err)
	}
	for k, h := range v.have {
		if pos[k] < h {
			m.t.Fatalf("%s frame id takes partition %v back to %d; the viewer holds up to %d", what, k, pos[k], h)
		}
	}
	for k, o := range pos {
		i, known := m.byKey[k]
		if !known {
			m.t.Fatalf("%s frame id names partition %v, not in the log", what, k)
		}
		if next, ok := m.parts[i].after(max(v.have[k], v.floor[k])); ok && next < o {
			m.t.Fatalf("%s frame id claims %v up to %d, but the viewer was not sent offset %d", what, k, o, next)
		}
		v.have[k] = max(v.have[k], o)
	}
	v.ids = append(v.ids, id)
	m.frames++
}

// modelHistory reads the model's log back, as consumer.History reads Kafka.
type modelHistory struct{ m *model }

func (h modelHistory) Read(_ context.Context, ranges []Range) ([]sse.Event, error) {
	m := h.m
	if m.during != nil {
		m.during()
	}
	if m.c.chance(10) {
		return nil, errors.New("kafka unreachable")
	}
	var out []sse.Event
	for _, r := range ranges {
		i, ok := m.byKey[sse.KeyOf(r.Topic, r.TopicID, r.Partition)]
		if !ok {
			m.t.Fatalf("read back %+v: no such partition", r)
		}
		p := m.parts[i]
		for j, o := range p.offs {
			if o < r.From || o >= r.To {
				continue
			}
			if j < p.start {
				return nil, errors.New("offset out of range")
			}
			out = append(out, m.event(i, o))
		}
	}
	return out, nil
}
