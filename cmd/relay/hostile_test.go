package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
	"github.com/decnet/identity-relay/pkg/api"
	"github.com/decnet/identity-relay/pkg/sse"
)

// What hostile resumes can make a replica hold is bounded: clients of many
// users that never read resume from far behind a tiny window (20,000 records
// of 4 KiB: 80 MiB to read back), and from just inside the read-back bound.
// Read-backs run four at once, one per user, each at most 8 MiB of records
// and of frames, held until written or cut. Before these bounds, one such
// resume took the relay's RSS from 77 to 216 MiB and four took it to 779
// (measured on --demo, for the issue).
func TestHostileResumesMemoryBounded(t *testing.T) {
	const records, size, users = 20000, 4096, 8
	env, topic := relaytest.TopicEnv(t, map[string]string{
		"RELAY_REPLAY_WINDOW": "3", "RELAY_SSE_WRITE_TIMEOUT": "3s", "RELAY_LOG_LEVEL": "info",
	})
	r, _ := relaytest.StartOnTopic(t, env, topic, 1)

	pad := strings.Repeat("x", size)
	batch := make([]*kgo.Record, records)
	for i := range batch {
		batch[i] = &kgo.Record{Topic: topic, Value: fmt.Appendf(nil, `{"p":0,"seq":%d,"pad":%q}`, i, pad)}
	}
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := cl.ProduceSync(ctx, batch...).FirstErr(); err != nil {
		t.Fatalf("produce: %v", err)
	}
	// The ids the stream gave those records: the position after each.
	details, err := kadm.NewClient(cl).ListTopics(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	idAfter := func(offset int64) string {
		return sse.Position{sse.KeyOf(topic, details[topic].ID, 0): offset + 1}.Encode()
	}
	waitMetricAtLeast(t, r.URL, "relay_events_published_total", records, 2*time.Minute)

	pid := r.Pid()
	rssStart := vmRSS(t, pid)
	stopSampling := sampleRSS(pid, rssStart)

	// Per user: one resume from the first record (80 MiB behind: given up
	// at 8 MiB, then a snapshot), two from 1,800 records back (7.4 MiB of
	// records: read back, and held for a client that never reads).
	addr := strings.TrimPrefix(r.URL, "http://")
	for range users {
		tok := relaytest.ViewerToken(t)
		for _, id := range []string{idAfter(0), idAfter(records - 1800), idAfter(records - 1800)} {
			request := "GET " + api.EventsPath + "?token=" + tok + " HTTP/1.1\r\nHost: relay\r\nLast-Event-ID: " + id + "\r\n\r\n"
			dialStalled(t, addr, []byte(request))
		}
	}
	// Every resume is served: read back and cut once its write timeout
	// passes, or given up for a snapshot (those streams stay open, small).
	want := float64(3 * users)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		kafka := relaytest.Metric(t, r.URL, `relay_resumes_total{via="kafka"}`)
		done := relaytest.Metric(t, r.URL, `relay_resumes_total{via="snapshot"}`) + kafka
		cut := relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="write_error"}`)
		if done >= want && cut >= kafka {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v of %v resumes served, %v of %v read back cut, after 3 minutes", done, want, cut, kafka)
		}
		time.Sleep(200 * time.Millisecond)
	}
	peak := stopSampling()

	// Four read-backs at once, each holding at most 8 MiB of decoded records
	// and 8 MiB of frames, and 1 MiB fetches: about 70 MiB live. What RSS
	// that becomes depends on when the garbage collector runs, which depends
	// on how loaded the machine is: +69 to +93 MiB measured alone, +204 MiB
	// with two suites running at once. The bound leaves room for that and
	// still fails the relay before these bounds (+1,213 MiB in this test).
	const bound = 512 << 20
	kafka := relaytest.Metric(t, r.URL, `relay_resumes_total{via="kafka"}`)
	t.Logf("%d hostile resumes from %d users (%v read back, the rest a snapshot): VmRSS %s before, peak %s (+%s), bound +%s",
		3*users, users, kafka, mib(rssStart), mib(peak), mib(peak-rssStart), mib(bound))
	if kafka < 1 { // how many depends on scheduling: each waits 5 s at most for a slot
		t.Fatal("no resume was read back: the bound was not exercised")
	}
	if grew := peak - rssStart; grew > bound {
		t.Fatalf("VmRSS grew by %s during the hostile resumes, over the bound %s", mib(grew), mib(bound))
	}
}
