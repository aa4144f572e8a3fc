// Command relay-load drives a running relay with many SSE viewers while it
// produces events into Kafka, and reports what the viewers saw: frames
// delivered per second, produce-to-viewer latency, gaps and duplicates, the
// relay's CPU per million frames and RSS per viewer, keepalive timeliness,
// and when the relay cut viewers that stopped reading. scripts/bench.sh runs
// the standard scenarios against a relay it starts; --help lists the flags.
// It is a module of its own (it imports nothing of the relay) and runs on
// Linux only; elsewhere it builds to a stub that says so.
//
//	make relay-load   # from the repository root: bin/relay-load
//	bin/relay-load --url http://127.0.0.1:8080 --jwt-secret "$SECRET" --user bench-viewer \
//	    --brokers 127.0.0.1:9092 --viewers 1000 --rate 400 --duration 60s --relay-pid "$(pgrep -nx relay)"
//
// # Run
//
// Every run goes: create the topic if absent; connect the viewers (each
// reads to its snapshot frame); wait --settle and read the relay's RSS;
// produce one priming record per partition and wait until every viewer
// has them (proof that the relay reads the topic, which it finds within
// seconds when the topic is new); then one of
//   - rate (--rate): records paced at the rate for --warmup, then the
//     measured --duration; record i is due at start + i/rate, and after a late
//     wake-up every record already due is sent at once (the report gives the
//     worst lateness: on a quiet machine it is a millisecond or two);
//   - burst (--burst N): N records as fast as the client takes them; the
//     measured interval runs from the first record sent to the last frame
//     received;
//   - idle (neither): nothing produced for --warmup and --duration.
//
// and then waits (at most --drain) until every reading viewer has every
// record, and ends. Each phase has its own limit and the whole run
// another, so the tool always exits by itself.
//
// # Viewers
//
// A viewer is a raw TCP connection, one goroutine, one read buffer
// (--read-buffer, 4 KiB) and an incremental parser of the HTTP/1.1 body
// (chunked or not) and of SSE: it keeps the first 512 bytes of each line
// and the state of the current frame, and allocates nothing per frame.
// Viewers are spread over the source addresses 127.0.0.1..127.0.0.k
// (--source-ips), with IP_BIND_ADDRESS_NO_PORT so that each address offers
// its whole ephemeral port range to the relay's address. Past --per-process
// viewers (18,000: the process may hold 20,000 descriptors) the tool runs
// itself again as worker processes (--worker), each with a contiguous share
// of the viewers, driven over stdin/stdout with one JSON object a line;
// their reports (counters, latency histograms, per-viewer figures) merge
// by adding. One token serves every viewer: the relay's per-user cap
// (RELAY_SSE_MAX_PER_USER) must allow them.
//
// --protocol says what serves the viewers. relay (the default; also the
// minimal server, tools/relay-load/minimal): GET <url>/api/v1/identities/events?token=,
// a token with the uuid claim, frames as in the wire contract, the
// snapshot frame ending the set-up. centrifugo: GET
// <url>/connection/uni_sse?cf_connect={"token":...} (Centrifugo's
// uni-directional SSE), a token with sub and channels ["identity"] (a
// server-side subscription), and every record carries the header
// centrifugo-channels: identity, which Centrifugo's Kafka consumer in
// publication data mode reads; its frames are one data line each, told
// apart by the push object's first key: connect (the set-up's end), {}
// (its ping, counted as a keepalive), disconnect (as the relay's error
// event), anything else a publication whose data is the record value.
//
// # Payload
//
// Each record value is the publisher's envelope, --value-bytes long:
//
//	{"v":1,"id":"...","topic":"...","type":"...","ts":...,"payload":{"run":"<run id>","part":P,"seq":N,"sent_ns":T,"identity_uuid":"...","pad":"xxx..."}}
//
// seq counts per partition from 0 (-1 is a priming record) and sent_ns is
// the wall clock just before the record goes to the client. Frames of
// other runs (other run id) are counted as foreign and otherwise ignored.
//
// # Figures
//
//   - frames/s: this run's frames received by all viewers whose receive
//     time falls in the measured interval, over its length (burst: all
//     frames over first-sent to last-received). The expected figure is the
//     achieved producing rate times the viewers that read.
//   - latency: receive time (the return of the read that completed the
//     frame) minus sent_ns, for records sent in the measured interval;
//     log-linear histogram, within 0.8%. Both instants are time.Now() read
//     as wall-clock nanoseconds on this machine (the producer and the
//     viewers are one process, or workers on the same host): one clock, no
//     offset between them. The send time is taken before the record is
//     handed to the Kafka client (linger 0), so the figure includes the
//     client, the broker, the server's fetch, its queues and writes, the
//     kernel, and the wait for the tool's reader to run: the tool and the
//     server share the machine. Frames that arrive in one read share its
//     receive time. tools/relay-load/probe measures the same thing another
//     way (BENCHMARKS.md, "Calibration").
//   - gaps and duplicates: per viewer and partition, a seq above the next
//     expected counts the missing ones as gaps, a seq below as a duplicate.
//     A reader is complete when it has every seq produced.
//   - disconnected: readers whose stream ended before the tool closed it
//     (the relay drops a viewer whose queue is full: reason "slow" in its
//     metrics), with when they ended.
//   - relay CPU: utime+stime of /proc/<--relay-pid>/stat at the start and the
//     end of the measured interval, per million frames of that interval. The
//     tool's own CPU over the same interval (every process: reading,
//     parsing, producing) is reported too, also per million frames.
//   - relay writes: the relay's write system calls over the same interval
//     (syscw of /proc/<--relay-pid>/io: write and writev) per frame; its
//     inverse is how many frames a write carried.
//   - relay RSS per viewer: (VmRSS after connecting and --settle − VmRSS
//     before connecting) / viewers connected. Garbage collection moves RSS by
//     megabytes, so the figure means something with thousands of viewers.
//     RSS and CPU are also sampled every second (the "over time" series).
//   - keepalive timeliness: per reading viewer, the longest silence between
//     two things received (frames or keepalive comments) inside the
//     measured interval, the silence from the last one to the end included;
//     late means longer than --keepalive + --keepalive-tolerance.
//
// # Stalled viewers and when they are cut
//
// --stalled K viewers (spread evenly over the N) set SO_RCVBUF to
// --stalled-rcvbuf before connecting, read to their snapshot, then never
// read again. The relay's close of such a connection cannot be seen from the
// viewer's socket: its FIN waits behind the unread bytes. But the relay's
// end of the connection is in the same network namespace, so the tool lists
// the host's TCP sockets every --tcp-poll (100 ms) with netlink sock_diag
// (as ss does; /proc/net/tcp cost too much CPU on a machine the relay shares)
// and follows, for each stalled viewer, the relay's socket (local = relay
// address, remote = the viewer):
//   - its send queue (written by the relay, not yet acknowledged)
//     grows while the kernel buffers take the frames; the last time it grew
//     is when the relay's writes started to block, so when the relay's
//     per-viewer channel started to fill ("queue full after");
//   - the first poll that finds it out of ESTABLISHED (FIN_WAIT1, or gone)
//     is when the relay closed it ("cut after").
//
// Times count from the first produced record; "channel filling to cut" is
// the difference of the two, each within one poll. At the end each stalled
// viewer reads what is left for --stalled-drain: EOF or a reset confirms the
// relay closed it; a timeout means it was still open.
//
// # In-process Kafka
//
// --kfake serves franz-go's kfake on 127.0.0.1:--kfake-port with the topic
// seeded, prints its address on stdout and runs until SIGTERM or --kfake-for.
package main
