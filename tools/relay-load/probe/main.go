// Command probe is the second, simpler latency measurement that calibrates
// relay-load (BENCHMARKS.md, "Calibration"): a few viewers of an SSE
// server that needs no token (the minimal server), read with net/http and
// bufio, each data line decoded with encoding/json, latency = time.Now()
// after the line was read − the record's sent_ns. It shares no code with
// relay-load's viewers (raw reads, the incremental parser, the receive
// time taken at the read's return, a log-linear histogram): where the two
// agree, neither method is what the figure measures. It reads until
// SIGTERM (or SIGINT) and then prints exact quantiles over the events whose
// per-partition seq is in [--seq-from, --seq-to): the records that the
// tool measures in its window are chosen by seq the same way (bench.sh
// passes rate × warm-up ÷ partitions and rate × (warm-up + duration) ÷
// partitions).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"
)

func main() {
	url := flag.String("url", "http://127.0.0.1:8090/api/v1/identities/events", "the SSE stream")
	viewers := flag.Int("viewers", 5, "streams to open")
	from := flag.Int64("seq-from", 0, "first per-partition seq measured")
	to := flag.Int64("seq-to", math.MaxInt64, "first per-partition seq not measured")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var mu sync.Mutex
	var lat []float64 // ms
	for range *viewers {
		resp, err := http.Get(*url)
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			r := bufio.NewReader(resp.Body)
			for {
				line, err := r.ReadBytes('\n')
				if err != nil {
					return
				}
				now := time.Now()
				d, ok := bytes.CutPrefix(line, []byte("data: "))
				if !ok {
					continue
				}
				var v struct {
					Payload struct {
						Seq    *int64 `json:"seq"`
						SentNs int64  `json:"sent_ns"`
					} `json:"payload"`
				}
				if json.Unmarshal(d, &v) != nil || v.Payload.Seq == nil {
					continue // the snapshot
				}
				if *v.Payload.Seq >= *from && *v.Payload.Seq < *to {
					mu.Lock()
					lat = append(lat, float64(now.UnixNano()-v.Payload.SentNs)/1e6)
					mu.Unlock()
				}
			}
		}()
	}
	<-ctx.Done()
	mu.Lock()
	defer mu.Unlock()
	if len(lat) == 0 {
		fmt.Fprintln(os.Stderr, "probe: no events in the window")
		os.Exit(1)
	}
	slices.Sort(lat)
	q := func(p float64) float64 { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	fmt.Printf("probe: %d viewers, %d events: latency p50 %.2f ms, p99 %.2f ms, max %.2f ms\n",
		*viewers, len(lat), q(0.5), q(0.99), lat[len(lat)-1])
}
