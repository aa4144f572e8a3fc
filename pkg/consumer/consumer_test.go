package consumer

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/pkg/sse"
)

// refusingSink refuses every event with err.
type refusingSink struct{ err error }

func (s refusingSink) Publish(sse.Event) error              { return s.err }
func (s refusingSink) Behind() bool                         { return false }
func (s refusingSink) Empty(string, [16]byte, int32, int64) {}

// A record the broadcaster refuses is skipped and counted under the reason
// the refusal names.
func TestRefusedRecordsCounted(t *testing.T) {
	for _, c := range []struct {
		err    error
		reason string
	}{
		{sse.ErrBadName, SkipBadTopic},
		{sse.ErrTooManyPartitions, SkipTooManyPartitions},
	} {
		reg := prometheus.NewRegistry()
		cons, err := New(Config{Brokers: []string{"127.0.0.1:1"}, TopicsRegex: ".", MaxRecordBytes: 1 << 20, Registerer: reg}, refusingSink{c.err})
		if err != nil {
			t.Fatal(err)
		}
		cons.handle(&kgo.Record{Topic: "identity.formed", Value: []byte(`{}`)}, [16]byte{})
		var m dto.Metric
		if err := cons.skipped.WithLabelValues(c.reason).Write(&m); err != nil {
			t.Fatal(err)
		}
		if got := m.GetCounter().GetValue(); got != 1 {
			t.Errorf("%v: relay_records_skipped_total{reason=%q} = %v, want 1", c.err, c.reason, got)
		}
	}
}
