package main

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/pkg/api"
)

// Over real HTTP with the in-process broker: a record on identity.formed reaches
// the viewer as the exact frame, a foreign topic is not delivered, and a
// matching topic created while the relay runs is delivered within 10 s.
func TestEndToEndInProcessKafka(t *testing.T) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "identity.formed", "other.topic"),
		kfake.AllowAutoTopicCreation())
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	brokers := cluster.ListenAddrs()

	db := relaytest.DB(t)
	relay := relaytest.Start(t, relaytest.Env(t, brokers))
	relay.WaitReady(t)
	user := relaytest.AddUser(t, db, "viewer")
	s := relaytest.Dial(t, relay.URL, relaytest.Token(t, relaytest.Secret, user))
	s.ExpectStart(t)

	cl := relaytest.Producer(t, brokers)
	relaytest.Produce(t, cl, "other.topic", 0, `{"v":1,"type":"x","payload":{"identity_uuid":"foreign"}}`)
	relaytest.Produce(t, cl, "identity.formed", 0,
		`{"v":1,"id":"ab12","topic":"ignored","type":"formed","ts":1750000000.123,"payload":{"identity_uuid":"u-1","observation_uuids":["o-1","o-2"]}}`)
	want := "event: formed\ndata: {\"topic\":\"identity.formed\",\"type\":\"formed\",\"ts\":1750000000.123," +
		"\"payload\":{\"identity_uuid\":\"u-1\",\"observation_uuids\":[\"o-1\",\"o-2\"]}}\n\n"
	if _, got := relaytest.SplitID(t, s.NextEvent(t, 15*time.Second)); got != want {
		t.Fatalf("frame\n got %q\nwant %q", got, want)
	}

	// A topic that did not exist when the relay started.
	start := time.Now()
	relaytest.Produce(t, cl, "identity.campaign.assigned", 0,
		`{"identity_uuid":"u-1","campaign_uuid":"c-1","prior_campaign_uuid":null}`)
	_, got := relaytest.SplitID(t, s.NextEvent(t, 10*time.Second))
	prefix := "event: campaign.assigned\ndata: {\"topic\":\"identity.campaign.assigned\",\"type\":\"campaign.assigned\",\"ts\":"
	suffix := ",\"payload\":{\"identity_uuid\":\"u-1\",\"campaign_uuid\":\"c-1\",\"prior_campaign_uuid\":null}}\n\n"
	if !strings.HasPrefix(got, prefix) || !strings.HasSuffix(got, suffix) {
		t.Fatalf("frame for the new topic %q", got)
	}
	t.Logf("new topic delivered %v after its first record", time.Since(start).Round(time.Millisecond))
}

// The demo needs nothing installed: its printed URL streams a snapshot and then live events.
func TestDemoStreams(t *testing.T) {
	relay := relaytest.Start(t, map[string]string{"RELAY_LISTEN_ADDR": "127.0.0.1:0"}, "--demo")
	re := regexp.MustCompile(`Stream: (http://\S+)` + regexp.QuoteMeta(api.EventsPath) + `\?token=(\S+)`)
	var m []string
	for deadline := time.Now().Add(10 * time.Second); m == nil && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		m = re.FindStringSubmatch(relay.Logs())
	}
	if m == nil {
		t.Fatalf("demo printed no stream URL:\n%s", relay.Logs())
	}
	s := relaytest.Dial(t, m[1], m[2])
	var snap struct {
		Identities []map[string]any `json:"identities"`
	}
	if err := json.Unmarshal([]byte(s.ExpectStart(t)), &snap); err != nil {
		t.Fatal(err)
	}
	if len(snap.Identities) < 3 {
		t.Fatalf("demo snapshot has %d identities", len(snap.Identities))
	}
	_, ev := relaytest.SplitID(t, s.NextEvent(t, 5*time.Second))
	if !regexp.MustCompile(`^event: (formed|observation\.linked|merged|unmerged|campaign\.assigned)\ndata: \{"topic":"identity\.`).MatchString(ev) {
		t.Fatalf("demo event %q", ev)
	}
	if page := relaytest.Get(t, m[1]+"/"); !strings.Contains(page, "new EventSource(") {
		t.Fatal("demo page does not open an EventSource")
	}
}
