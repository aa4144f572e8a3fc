package testenv_test

import (
	"context"
	"database/sql"
	"fmt"
	"reflect"
	"runtime"
	"testing"
	"time"

	_ "github.com/lib/pq"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/testenv"
)

func TestKafkaBrokersParsesList(t *testing.T) {
	t.Setenv(testenv.EnvKafkaBrokers, " 127.0.0.1:1, 127.0.0.1:2,, ")
	got := testenv.KafkaBrokers(t)
	want := []string{"127.0.0.1:1", "127.0.0.1:2"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("KafkaBrokers = %q, want %q", got, want)
	}
}

func TestMissingServiceSkipsOrFails(t *testing.T) {
	// Run the lookup in a throwaway testing.T-like wrapper: a skip and a
	// fatal both end the goroutine, so look at what the wrapper recorded.
	for _, require := range []string{"", "1"} {
		t.Run("require="+require, func(t *testing.T) {
			t.Setenv(testenv.EnvDatabaseURL, "")
			t.Setenv(testenv.EnvRequireServices, require)
			rec := &recorder{TB: t}
			done := make(chan struct{})
			go func() {
				defer close(done)
				testenv.DatabaseURL(rec)
			}()
			<-done
			switch {
			case require == "1" && !rec.failed:
				t.Fatalf("with %s=1 a missing %s must fail the test", testenv.EnvRequireServices, testenv.EnvDatabaseURL)
			case require == "" && !rec.skipped:
				t.Fatalf("without %s a missing %s must skip the test", testenv.EnvRequireServices, testenv.EnvDatabaseURL)
			}
		})
	}
}

// recorder records Fatal/Skip instead of acting on the real test.
type recorder struct {
	testing.TB
	failed, skipped bool
}

func (r *recorder) Helper()                           {}
func (r *recorder) Fatalf(format string, args ...any) { r.failed = true; runtime.Goexit() }
func (r *recorder) Skipf(format string, args ...any)  { r.skipped = true; runtime.Goexit() }

func openDB(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", testenv.DatabaseURL(t))
	if err != nil {
		t.Fatalf("sql.Open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func TestPostgres(t *testing.T) {
	db := openDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var one int
	if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("SELECT 1 = %d, %v", one, err)
	}
	for _, table := range []string{"attacker_identities", "users", "revoked_tokens"} {
		var exists bool
		if err := db.QueryRowContext(ctx, "SELECT to_regclass($1) IS NOT NULL", "public."+table).Scan(&exists); err != nil {
			t.Fatalf("looking up table %s: %v", table, err)
		}
		if !exists {
			t.Errorf("table %s missing: scripts/pg.sh applies internal/store/schema.sql", table)
		}
	}
}

func newKafkaClient(t *testing.T, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	opts = append([]kgo.Opt{kgo.SeedBrokers(testenv.KafkaBrokers(t)...)}, opts...)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		t.Fatalf("kgo.NewClient: %v", err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func TestKafka(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	adm := kadm.NewClient(newKafkaClient(t))
	brokers, err := adm.ListBrokers(ctx)
	if err != nil {
		t.Fatalf("ListBrokers: %v", err)
	}
	if len(brokers) == 0 {
		t.Fatal("ListBrokers returned no broker")
	}
	t.Logf("brokers: %v", brokers.NodeIDs())

	// Auto-created topic, produce and consume one record.
	topic := fmt.Sprintf("testenv-smoke-%d", time.Now().UnixNano())
	t.Cleanup(func() { _, _ = adm.DeleteTopics(context.Background(), topic) })
	produceOne(ctx, t, topic, "hello")
	if got := consumeOne(ctx, t, topic); got != "hello" {
		t.Fatalf("consumed %q, want %q", got, "hello")
	}
}

func produceOne(ctx context.Context, t *testing.T, topic, value string) {
	t.Helper()
	cl := newKafkaClient(t, kgo.AllowAutoTopicCreation())
	if err := cl.ProduceSync(ctx, &kgo.Record{Topic: topic, Value: []byte(value)}).FirstErr(); err != nil {
		t.Fatalf("produce to %s: %v", topic, err)
	}
	cl.Close()
}

func consumeOne(ctx context.Context, t *testing.T, topic string) string {
	t.Helper()
	cl := newKafkaClient(t, kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	defer cl.Close()
	for {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("consume from %s: %v", topic, err)
		}
		for _, e := range fs.Errors() {
			t.Logf("fetch error (retrying): %s/%d: %v", e.Topic, e.Partition, e.Err)
		}
		if recs := fs.Records(); len(recs) > 0 {
			return string(recs[0].Value)
		}
	}
}

// TestServicesRestart stops and starts both services through the helpers the
// fault tests use, and checks the data outlives the restart.
func TestServicesRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts PostgreSQL and Kafka; skipped in -short mode")
	}
	db := openDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	marker := fmt.Sprintf("restart-%d", time.Now().UnixNano())
	topic := "testenv-" + marker

	// The probe table must not collide with the schema's tables.
	if _, err := db.ExecContext(ctx, "CREATE TABLE IF NOT EXISTS testenv_probe (v TEXT PRIMARY KEY)"); err != nil {
		t.Fatalf("create probe table: %v", err)
	}
	t.Cleanup(func() {
		_, _ = db.ExecContext(context.Background(), "DELETE FROM testenv_probe WHERE v = $1", marker)
	})
	if _, err := db.ExecContext(ctx, "INSERT INTO testenv_probe (v) VALUES ($1)", marker); err != nil {
		t.Fatalf("insert: %v", err)
	}
	produceOne(ctx, t, topic, marker)

	testenv.StopPostgres(t)
	testenv.StopPostgres(t) // idempotent
	if err := db.PingContext(ctx); err == nil {
		t.Error("PostgreSQL still answers after StopPostgres")
	}
	testenv.StartPostgres(t)
	testenv.StartPostgres(t) // idempotent

	testenv.StopKafka(t)
	probe := newKafkaClient(t, kgo.RequestRetries(0), kgo.DialTimeout(time.Second))
	pctx, pcancel := context.WithTimeout(ctx, 3*time.Second)
	if _, err := kadm.NewClient(probe).ListBrokers(pctx); err == nil {
		t.Error("Kafka still answers after StopKafka")
	}
	pcancel()
	testenv.StartKafka(t)

	// database/sql reconnects on its own.
	var got string
	if err := db.QueryRowContext(ctx, "SELECT v FROM testenv_probe WHERE v = $1", marker).Scan(&got); err != nil {
		t.Fatalf("row written before the restart: %v", err)
	}
	if v := consumeOne(ctx, t, topic); v != marker {
		t.Fatalf("record written before the restart: got %q, want %q", v, marker)
	}
	adm := kadm.NewClient(newKafkaClient(t))
	if _, err := adm.DeleteTopics(ctx, topic); err != nil {
		t.Logf("delete topic %s: %v", topic, err)
	}
}
