// Command minimal is the smallest honest Kafka-to-SSE relay: the yardstick
// that scripts/bench.sh --peers runs beside the relay, with the same load
// tool and scenarios. One franz-go consumer of every partition of the
// matching topics, one buffered channel per viewer, one write per event,
// and a flush when the viewer's channel is empty (what any buffered writer
// does: frames that queued while a viewer was being written go out in one
// system call); a viewer whose channel is full is dropped. No
// authentication, no snapshot query (an empty snapshot frame, which the
// load tool waits for), no ids, no replay, no timers besides the keepalive.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

type hub struct {
	mu     sync.Mutex
	viewer map[chan []byte]struct{}
}

// publish offers a frame to every viewer, dropping those whose channel is full.
func (h *hub) publish(frame []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for c := range h.viewer {
		select {
		case c <- frame:
		default:
			delete(h.viewer, c)
			close(c)
		}
	}
}

func (h *hub) serve(buffer int, keepalive time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c := make(chan []byte, buffer)
		h.mu.Lock()
		h.viewer[c] = struct{}{}
		h.mu.Unlock()
		defer func() {
			h.mu.Lock()
			if _, ok := h.viewer[c]; ok {
				delete(h.viewer, c)
				close(c)
			}
			h.mu.Unlock()
		}()
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		fl := w.(http.Flusher)
		fmt.Fprint(w, ": keepalive\n\nevent: snapshot\ndata: {\"identities\":[]}\n\n")
		fl.Flush()
		tick := time.NewTicker(keepalive)
		defer tick.Stop()
		for {
			select {
			case <-r.Context().Done():
				return
			case <-tick.C:
				if _, err := fmt.Fprint(w, ": keepalive\n\n"); err != nil {
					return
				}
				fl.Flush()
			case frame, ok := <-c:
				if !ok {
					return // dropped as slow
				}
				if _, err := w.Write(frame); err != nil {
					return
				}
				// A flush per frame would be a write(2) per frame per viewer:
				// 400k a second at 400 events/s x 1,000, more than 2 cores do.
				if len(c) == 0 {
					fl.Flush()
				}
			}
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8090", "address to serve on")
	brokers := flag.String("brokers", "127.0.0.1:9092", "Kafka bootstrap brokers, comma list")
	topics := flag.String("topics", `^identity\..+`, "topics to read (regex)")
	buffer := flag.Int("buffer", 256, "frames queued per viewer")
	keepalive := flag.Duration("keepalive", 15*time.Second, "keepalive comment this often")
	flag.Parse()
	cl, err := kgo.NewClient(kgo.SeedBrokers(strings.Split(*brokers, ",")...),
		kgo.ConsumeTopics(*topics), kgo.ConsumeRegex(),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.MetadataMinAge(100*time.Millisecond), kgo.MetadataMaxAge(time.Second)) // finds each scenario's new topic at once
	if err != nil {
		log.Fatal(err)
	}
	defer cl.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	h := &hub{viewer: map[chan []byte]struct{}{}}
	go func() {
		for ctx.Err() == nil {
			cl.PollFetches(ctx).EachRecord(func(rec *kgo.Record) {
				name := strings.TrimPrefix(rec.Topic, "identity.")
				// The load tool's values are compact JSON: one data line.
				h.publish(fmt.Appendf(nil, "event: %s\ndata: %s\n\n", name, rec.Value))
			})
		}
	}()
	http.HandleFunc("/api/v1/identities/events", h.serve(*buffer, *keepalive))
	http.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ready") })
	srv := &http.Server{Addr: *listen}
	go func() { <-ctx.Done(); _ = srv.Close() }()
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
