// Package demo runs the relay with nothing else installed: an in-process
// Kafka broker (franz-go's kfake), a publisher of realistic identity events,
// an in-memory store in place of PostgreSQL, and a live page.
package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/store"
	"github.com/decnet/identity-relay/internal/users"
	"github.com/decnet/identity-relay/pkg/api"
)

// Topics are the ones DECNET's publishers write (CONTRACT.md).
var Topics = []string{
	"identity.formed", "identity.observation.linked", "identity.merged",
	"identity.unmerged", "identity.campaign.assigned",
}

// Demo is a running demo environment.
type Demo struct {
	Secret  string
	Token   string // a viewer token valid for 24 h
	cluster *kfake.Cluster
	store   *memStore
	log     *slog.Logger
}

// Start starts the in-process broker and the store, and mints a viewer token.
func Start(log *slog.Logger) (*Demo, error) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, Topics...), kfake.AllowAutoTopicCreation())
	if err != nil {
		return nil, fmt.Errorf("demo: kafka: %w", err)
	}
	d := &Demo{Secret: randHex(32), cluster: cluster, store: newMemStore(), log: log.With("component", "demo")}
	viewer := users.User{UUID: newUUID(), Username: "demo-viewer", Role: "viewer"}
	d.store.addUser(viewer)
	now := time.Now()
	tok := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"uuid": viewer.UUID, "jti": randHex(16), "iat": now.Unix(), "exp": now.Add(24 * time.Hour).Unix(),
	})
	if d.Token, err = tok.SignedString([]byte(d.Secret)); err != nil {
		cluster.Close()
		return nil, fmt.Errorf("demo: token: %w", err)
	}
	for range 5 {
		d.form(now)
	}
	return d, nil
}

// Brokers returns the in-process broker's address.
func (d *Demo) Brokers() []string { return d.cluster.ListenAddrs() }

// Store is the in-memory stand-in for PostgreSQL.
func (d *Demo) Store() api.Store { return d.store }

// Close stops the broker.
func (d *Demo) Close() { d.cluster.Close() }

// Publish writes one realistic identity event about every interval until ctx ends.
func (d *Demo) Publish(ctx context.Context, interval time.Duration) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(d.Brokers()...), kgo.ProducerLinger(0))
	if err != nil {
		return fmt.Errorf("demo: producer: %w", err)
	}
	defer cl.Close()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			topic, payload := d.next(now)
			env := map[string]any{
				"v": 1, "id": randHex(16), "topic": topic, "type": topic[len("identity."):],
				"ts": float64(now.UnixMilli()) / 1000, "payload": payload,
			}
			value, _ := json.Marshal(env)
			if err := cl.ProduceSync(ctx, &kgo.Record{Topic: topic, Value: value}).FirstErr(); err != nil && ctx.Err() == nil {
				d.log.Warn("demo publish failed", "err", err)
			}
		}
	}
}

// next changes the store the way DECNET's back end would and returns the
// event announcing the change, with CONTRACT.md's payload shapes.
func (d *Demo) next(now time.Time) (string, map[string]any) {
	live := d.store.live()
	if len(live) < 3 {
		return d.form(now)
	}
	pick := func() string { return live[mrand.IntN(len(live))] }
	switch r := mrand.IntN(10); {
	case r < 3:
		return d.form(now)
	case r < 6:
		id, obs := pick(), newUUID()
		d.store.update(id, func(i *store.Identity) { i.ObservationCount++; i.LastSeenAt = &store.Time{Time: now} })
		return "identity.observation.linked", map[string]any{"identity_uuid": id, "observation_uuid": obs}
	case r < 8:
		id, campaign := pick(), newUUID()
		var prior *string
		d.store.update(id, func(i *store.Identity) { prior = i.CampaignID; i.CampaignID = &campaign })
		return "identity.campaign.assigned", map[string]any{"identity_uuid": id, "campaign_uuid": campaign, "prior_campaign_uuid": prior}
	case r < 9:
		winner, loser := live[0], live[len(live)-1]
		d.store.update(loser, func(i *store.Identity) { i.MergedIntoUUID = &winner })
		d.store.update(winner, func(*store.Identity) {})
		return "identity.merged", map[string]any{"winner_uuid": winner, "loser_uuid": loser}
	default:
		former := pick()
		_, formed := d.form(now)
		return "identity.unmerged", map[string]any{"resurrected_uuid": formed["identity_uuid"], "former_winner_uuid": former}
	}
}

// form inserts a new identity and returns its identity.formed event.
func (d *Demo) form(now time.Time) (string, map[string]any) {
	obs := []string{newUUID(), newUUID()}
	conf := 0.5 + mrand.Float64()/2
	id := &store.Identity{
		UUID: newUUID(), SchemaVersion: 1, FirstSeenAt: &store.Time{Time: now}, LastSeenAt: &store.Time{Time: now},
		CreatedAt: store.Time{Time: now}, UpdatedAt: store.Time{Time: now}, Confidence: &conf,
		ObservationCount: len(obs), JA3Hashes: `["` + randHex(16) + `"]`, HASSHHashes: "[]", JA4HHashes: "[]",
		JA4QUICHashes: "[]", HTTPVersionsSeen: `["HTTP/1.1"]`, TLSCertSHA256: "[]", IPv6LinkLocalIIDs: "[]",
		PayloadSimhashes: "[]", C2Endpoints: "[]", KDDigraphSimhash: randBytes(8),
	}
	d.store.insert(id)
	return "identity.formed", map[string]any{"identity_uuid": id.UUID, "observation_uuids": obs}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func randHex(n int) string { return hex.EncodeToString(randBytes(n)) }

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	b := randBytes(16)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
