//go:build linux

package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		fmt.Fprintln(os.Stderr, "relay-load:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "relay-load:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

// config is every setting, filled once from the flags and checked once.
// Workers get it as JSON (without the secret).
type config struct {
	URL                string        `json:"url"`
	Protocol           string        `json:"protocol"`
	Token              string        `json:"-"`
	JWTSecret          string        `json:"-"`
	User               string        `json:"user"`
	Viewers            int           `json:"viewers"`
	Stalled            int           `json:"stalled"`
	SourceIPs          int           `json:"source_ips"`
	PerProcess         int           `json:"per_process"`
	ConnectConcurrency int           `json:"connect_concurrency"`
	ConnectTimeout     time.Duration `json:"connect_timeout"`
	ViewerTimeout      time.Duration `json:"viewer_timeout"`
	ReadBuffer         int           `json:"read_buffer"`
	StalledRcvBuf      int           `json:"stalled_rcvbuf"`
	StalledDrain       time.Duration `json:"stalled_drain"`
	TCPPoll            time.Duration `json:"tcp_poll"`
	Brokers            []string      `json:"brokers"`
	Topic              string        `json:"topic"`
	Partitions         int           `json:"partitions"`
	Rate               float64       `json:"rate"`
	Burst              int           `json:"burst"`
	ValueBytes         int           `json:"value_bytes"`
	Linger             time.Duration `json:"linger"`
	Duration           time.Duration `json:"duration"`
	Warmup             time.Duration `json:"warmup"`
	Drain              time.Duration `json:"drain"`
	Settle             time.Duration `json:"settle"`
	PrimeTimeout       time.Duration `json:"prime_timeout"`
	Keepalive          time.Duration `json:"keepalive"`
	KeepaliveTolerance time.Duration `json:"keepalive_tolerance"`
	RelayPID           int           `json:"relay_pid"`
	JSON               bool          `json:"-"`
	JSONOut            string        `json:"-"`
	Label              string        `json:"label"`
	DeleteTopic        bool          `json:"delete_topic"`
	KFake              bool          `json:"-"`
	KFakePort          int           `json:"-"`
	KFakeFor           time.Duration `json:"-"`
	Worker             bool          `json:"-"`
	Median             bool          `json:"-"`
	MedianOf           []string      `json:"-"`
}

func (c *config) producing() bool { return c.Rate > 0 || c.Burst > 0 }

func (c *config) mode() string {
	switch {
	case c.Rate > 0:
		return "rate"
	case c.Burst > 0:
		return "burst"
	}
	return "idle"
}

// maxRuntime bounds the whole run; every phase has its own limit inside it.
func (c *config) maxRuntime() time.Duration {
	d := c.ConnectTimeout + c.Settle + c.PrimeTimeout + c.Warmup + c.Drain + c.StalledDrain + 2*time.Minute
	if c.mode() != "burst" {
		d += c.Duration
	}
	return d
}

func parseFlags(args []string, out io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("relay-load", flag.ContinueOnError)
	fs.SetOutput(out)
	var brokers string
	fs.StringVar(&c.URL, "url", "http://127.0.0.1:8080", "relay base URL (loopback only)")
	fs.StringVar(&c.Protocol, "protocol", protoRelay, "what serves the viewers: relay (the relay's events endpoint and frames; also the minimal server) or centrifugo (Centrifugo's uni_sse transport, channel \""+centrifugoChannel+"\")")
	fs.StringVar(&c.Token, "token", "", "JWT for the viewers; else one is minted from --jwt-secret and --user")
	fs.StringVar(&c.JWTSecret, "jwt-secret", "", "HS256 secret to mint the token with (else $RELAY_JWT_SECRET)")
	fs.StringVar(&c.User, "user", "", "uuid claim of the minted token: a users row with role viewer or admin")
	fs.IntVar(&c.Viewers, "viewers", 100, "SSE viewers to open")
	fs.IntVar(&c.Stalled, "stalled", 0, "of the viewers, how many stop reading after the snapshot")
	fs.IntVar(&c.SourceIPs, "source-ips", 8, "spread viewers over source addresses 127.0.0.1..127.0.0.k")
	fs.IntVar(&c.PerProcess, "per-process", 18000, "most viewers per process; past it the tool runs worker processes")
	fs.IntVar(&c.ConnectConcurrency, "connect-concurrency", 200, "viewers connecting at once")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", 3*time.Minute, "limit on connecting every viewer")
	fs.DurationVar(&c.ViewerTimeout, "viewer-timeout", 30*time.Second, "limit on one viewer's dial, request and snapshot")
	fs.IntVar(&c.ReadBuffer, "read-buffer", 4096, "bytes of each viewer's read buffer")
	fs.IntVar(&c.StalledRcvBuf, "stalled-rcvbuf", 4096, "SO_RCVBUF of stalled viewers, bytes (the kernel doubles it)")
	fs.DurationVar(&c.StalledDrain, "stalled-drain", 5*time.Second, "at the end, how long a stalled viewer reads to find its connection's end")
	fs.DurationVar(&c.TCPPoll, "tcp-poll", 100*time.Millisecond, "how often the relay's sockets are read (netlink sock_diag) to see stalled viewers cut")
	fs.StringVar(&brokers, "brokers", "127.0.0.1:9092", "Kafka bootstrap brokers, comma list")
	fs.StringVar(&c.Topic, "topic", "identity.formed", "topic to produce to (created when absent)")
	fs.IntVar(&c.Partitions, "partitions", 3, "partitions of the topic when the tool creates it (at most 64)")
	fs.Float64Var(&c.Rate, "rate", 0, "events a second, paced, for --warmup then --duration")
	fs.IntVar(&c.Burst, "burst", 0, "produce this many events as fast as possible instead of --rate")
	fs.IntVar(&c.ValueBytes, "value-bytes", 256, "size of each record value, bytes")
	fs.DurationVar(&c.Linger, "linger", 0, "producer linger (0: send at once; the latency runs want 0)")
	fs.DurationVar(&c.Duration, "duration", 30*time.Second, "measured interval of rate and idle runs")
	fs.DurationVar(&c.Warmup, "warmup", 5*time.Second, "unmeasured time before --duration")
	fs.DurationVar(&c.Drain, "drain", 30*time.Second, "after producing, how long to wait for viewers to receive everything")
	fs.DurationVar(&c.Settle, "settle", 2*time.Second, "wait after connecting before reading the relay's RSS")
	fs.DurationVar(&c.PrimeTimeout, "prime-timeout", 30*time.Second, "limit on the priming record reaching every viewer (the relay finds new topics within seconds)")
	fs.DurationVar(&c.Keepalive, "keepalive", 15*time.Second, "the relay's RELAY_SSE_KEEPALIVE, to judge keepalive timeliness")
	fs.DurationVar(&c.KeepaliveTolerance, "keepalive-tolerance", time.Second, "a gap longer than keepalive plus this is late")
	fs.IntVar(&c.RelayPID, "relay-pid", 0, "pid of the relay, for CPU and RSS from /proc")
	fs.BoolVar(&c.JSON, "json", false, "print the report as JSON instead of the table")
	fs.StringVar(&c.JSONOut, "json-out", "", "also write the JSON report to this file")
	fs.StringVar(&c.Label, "label", "", "name of the run, printed in the report")
	fs.BoolVar(&c.DeleteTopic, "delete-topic", false, "delete the topic at the end, so that the next relay started does not read it back into its replay window")
	fs.BoolVar(&c.KFake, "kfake", false, "serve an in-process Kafka (kfake) instead of running load; prints its address")
	fs.IntVar(&c.KFakePort, "kfake-port", 0, "port of --kfake on 127.0.0.1 (0: any)")
	fs.DurationVar(&c.KFakeFor, "kfake-for", 2*time.Hour, "--kfake exits after this long at the latest")
	fs.BoolVar(&c.Median, "median", false, "print the median and range of each figure of the JSON reports named after the flags (runs of one scenario), then exit")
	fs.BoolVar(&c.Worker, "worker", false, "internal: run as a worker process of a parent relay-load")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	if c.Median {
		c.MedianOf = fs.Args()
		return c, nil
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	if c.JWTSecret == "" {
		c.JWTSecret = os.Getenv("RELAY_JWT_SECRET") // not a flag default: --help would print it
	}
	for _, b := range strings.Split(brokers, ",") {
		if b = strings.TrimSpace(b); b != "" {
			c.Brokers = append(c.Brokers, b)
		}
	}
	if c.Worker || c.KFake {
		return c, nil
	}
	return c, c.validate()
}

func (c *config) validate() error {
	bad := func(f string, a ...any) error { return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(f, a...)) }
	switch {
	case c.Viewers < 1:
		return bad("--viewers must be at least 1")
	case c.Stalled < 0 || c.Stalled > c.Viewers:
		return bad("--stalled must be between 0 and --viewers")
	case c.SourceIPs < 1 || c.SourceIPs > 254:
		return bad("--source-ips must be between 1 and 254")
	case c.PerProcess < 1:
		return bad("--per-process must be at least 1")
	case c.ConnectConcurrency < 1:
		return bad("--connect-concurrency must be at least 1")
	case c.ReadBuffer < 512:
		return bad("--read-buffer must be at least 512")
	case c.Rate < 0 || c.Burst < 0 || (c.Rate > 0 && c.Burst > 0):
		return bad("give --rate or --burst (or neither, for an idle run), not both")
	case c.Partitions < 1 || c.Partitions > 64:
		return bad("--partitions must be between 1 and 64")
	case c.ValueBytes < 1:
		return bad("--value-bytes must be positive")
	case c.Duration <= 0 && c.mode() != "burst":
		return bad("--duration must be positive")
	case c.Protocol != protoRelay && c.Protocol != protoCentrifugo:
		return bad("--protocol must be %s or %s", protoRelay, protoCentrifugo)
	case c.Token == "" && (c.JWTSecret == "" || c.User == ""):
		return bad("give --token, or --jwt-secret and --user to mint one")
	case c.producing() && len(c.Brokers) == 0:
		return bad("--brokers is empty")
	}
	if _, _, _, err := relayAddr(c.URL); err != nil {
		return bad("--url: %v", err)
	}
	return nil
}

// relayAddr resolves the relay URL to a loopback TCP address, its path and
// the Host header. Test traffic stays on 127.0.0.0/8.
func relayAddr(raw string) (*net.TCPAddr, string, string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, "", "", err
	}
	if u.Scheme != "http" {
		return nil, "", "", errors.New("want an http:// URL")
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "80"
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip := net.ParseIP(host).To4()
	if ip == nil || !ip.IsLoopback() {
		return nil, "", "", fmt.Errorf("host %q is not an IPv4 loopback address", u.Hostname())
	}
	a, err := net.ResolveTCPAddr("tcp4", net.JoinHostPort(ip.String(), port))
	if err != nil {
		return nil, "", "", err
	}
	return a, strings.TrimSuffix(u.Path, "/"), u.Host, nil
}

// The servers the viewers can read from.
const (
	protoRelay      = "relay"
	protoCentrifugo = "centrifugo"
	// centrifugoChannel is the channel every record is published to (the
	// record header centrifugoChannelsHeader) and every viewer's token
	// subscribes to (its channels claim: a server-side subscription).
	centrifugoChannel        = "identity"
	centrifugoChannelsHeader = "centrifugo-channels"
)

// streamRequest is the HTTP request that opens one viewer's stream: the
// relay's (and the minimal server's) events endpoint with ?token=, or
// Centrifugo's uni_sse endpoint with the connect request in ?cf_connect=.
func streamRequest(protocol, base, host, token string) []byte {
	target := base + "/api/v1/identities/events?token=" + url.QueryEscape(token)
	if protocol == protoCentrifugo {
		target = base + "/connection/uni_sse?cf_connect=" + url.QueryEscape(`{"token":"`+token+`"}`)
	}
	return []byte("GET " + target + " HTTP/1.1\r\nHost: " + host +
		"\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: relay-load\r\n\r\n")
}

// mintToken signs the viewers' HS256 token: the relay reads the user from
// the uuid claim, Centrifugo from sub, and subscribes the connection to
// the channels claim.
func mintToken(protocol, secret, user string, ttl time.Duration) (string, error) {
	now := time.Now()
	claims := jwt.MapClaims{"uuid": user, "jti": randomHex(8), "iat": now.Unix(), "exp": now.Add(ttl).Unix()}
	if protocol == protoCentrifugo {
		claims = jwt.MapClaims{"sub": user, "channels": []string{centrifugoChannel}, "iat": now.Unix(), "exp": now.Add(ttl).Unix()}
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	switch {
	case cfg.Median:
		return runMedian(cfg.MedianOf, stdout)
	case cfg.Worker:
		return runWorker(stdin, stdout)
	case cfg.KFake:
		return runKFake(ctx, cfg, stdout)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.maxRuntime())
	defer cancel()
	rep, err := load(ctx, cfg, args, stderr)
	if rep != nil {
		if werr := writeReport(cfg, rep, stdout); werr != nil && err == nil {
			err = werr
		}
	}
	return err
}

// logf prints progress to stderr.
type logf func(format string, a ...any)

// load runs the whole measurement and returns the report.
func load(ctx context.Context, cfg *config, args []string, stderr io.Writer) (*report, error) {
	start := time.Now()
	say := logf(func(f string, a ...any) {
		fmt.Fprintf(stderr, "relay-load %6.1fs: %s\n", time.Since(start).Seconds(), fmt.Sprintf(f, a...))
	})
	rep := newReport(cfg, args)
	token := cfg.Token
	if token == "" {
		var err error
		if token, err = mintToken(cfg.Protocol, cfg.JWTSecret, cfg.User, cfg.maxRuntime()+time.Hour); err != nil {
			return nil, err
		}
	}
	runID := randomHex(8)
	rep.RunID = runID

	parts := cfg.Partitions
	var prod *producer
	if cfg.producing() {
		var err error
		if prod, err = newProducer(cfg, runID); err != nil {
			return nil, err
		}
		defer prod.close()
		if cfg.DeleteTopic {
			defer func() {
				if err := prod.deleteTopic(); err != nil {
					say("delete topic: %v", err)
				}
			}()
		}
		if parts, err = prod.ensureTopic(ctx, cfg.Partitions); err != nil {
			return nil, err
		}
		if parts > 64 {
			return nil, fmt.Errorf("topic %s has %d partitions; the tool follows at most 64", cfg.Topic, parts)
		}
		say("topic %s ready, %d partitions", cfg.Topic, parts)
	}
	rep.Produce.Partitions = parts

	var sm *sampler
	if cfg.RelayPID > 0 {
		rss, err := relayRSS(cfg.RelayPID)
		if err != nil {
			return nil, fmt.Errorf("--relay-pid %d: %w", cfg.RelayPID, err)
		}
		rep.Relay.RSSBefore = rss
		sm = startSampler(ctx, cfg.RelayPID, start, time.Second)
		sm.setPhase("connect")
	}

	// Split the viewers over processes.
	nproc := (cfg.Viewers + cfg.PerProcess - 1) / cfg.PerProcess
	var groups []group
	defer func() {
		for _, g := range groups {
			g.close()
		}
	}()
	for i := range nproc {
		spec := groupSpec{Cfg: *cfg, Token: token, RunID: runID, Partitions: parts,
			Lo: i * cfg.Viewers / nproc, Hi: (i + 1) * cfg.Viewers / nproc}
		var g group
		if nproc == 1 {
			lg, err := newLocalGroup(spec)
			if err != nil {
				return nil, err
			}
			g = lg
		} else {
			rg, err := startWorker(spec, stderr)
			if err != nil {
				return nil, fmt.Errorf("start worker: %w", err)
			}
			g = rg
		}
		groups = append(groups, g)
	}
	rep.Viewers.Processes = nproc
	say("connecting %d viewers (%d stalled) from %d source addresses in %d process(es)", cfg.Viewers, cfg.Stalled, cfg.SourceIPs, nproc)

	cres := make([]*connectResult, len(groups))
	if err := each(groups, func(i int, g group) error {
		r, err := g.connect(ctx)
		cres[i] = r
		return err
	}); err != nil {
		return nil, err
	}
	total := &groupReport{}
	for _, r := range cres {
		mergeReports(total, &groupReport{Connect: *r})
	}
	rep.Viewers.Connected, rep.Viewers.Failures, rep.Viewers.ConnectSecs = total.Connect.Connected, total.Connect.Failures, total.Connect.Secs
	say("connected %d of %d in %.1fs; failures %v", total.Connect.Connected, cfg.Viewers, total.Connect.Secs, total.Connect.Failures)
	if total.Connect.Connected == 0 {
		return rep, errors.New("no viewer connected")
	}
	if sm != nil {
		sm.setPhase("settle")
		sleepCtx(ctx, cfg.Settle)
		rss, err := relayRSS(cfg.RelayPID)
		if err == nil {
			rep.Relay.RSSAfterConnect = rss
			rep.Relay.RSSPerViewer = float64(rss-rep.Relay.RSSBefore) / float64(total.Connect.Connected)
		}
	}

	statusAll := func(expect []int64) groupStatus {
		var sum groupStatus
		for _, g := range groups {
			if s, err := g.status(expect); err == nil {
				sum.Live += s.Live
				sum.Primed += s.Primed
				sum.Complete += s.Complete
				sum.Ended += s.Ended
			}
		}
		return sum
	}
	if prod != nil {
		// The priming records prove the relay reads the topic and reaches
		// every viewer before anything is measured.
		if sm != nil {
			sm.setPhase("prime")
		}
		prod.prime(ctx)
		deadline := time.Now().Add(cfg.PrimeTimeout)
		for {
			st := statusAll(nil)
			if st.Primed == st.Live {
				say("priming records reached all %d live viewers", st.Live)
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				rep.Notes = append(rep.Notes, fmt.Sprintf("priming records reached %d of %d live viewers within %v", st.Primed, st.Live, cfg.PrimeTimeout))
				say("%s", rep.Notes[len(rep.Notes)-1])
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	var cpu0, cpu1 usage
	var cpuMu sync.Mutex
	readCPU := func(into *usage) {
		if cfg.RelayPID == 0 {
			return
		}
		if u, err := relayUsage(cfg.RelayPID); err == nil {
			cpuMu.Lock()
			*into = u
			cpuMu.Unlock()
		}
	}
	// With workers, the parent's own CPU (the producer) counts as the tool's too.
	var parentCPU cpuWindow
	setWindow := func(from, to int64) {
		if nproc > 1 {
			parentCPU.arm(from, to)
		}
		_ = each(groups, func(_ int, g group) error { return g.window(from, to) })
	}
	var expect []int64
	var winFrom, winTo time.Time
	switch cfg.mode() {
	case "rate", "idle":
		winFrom = time.Now().Add(cfg.Warmup)
		winTo = winFrom.Add(cfg.Duration)
		setWindow(winFrom.UnixNano(), winTo.UnixNano())
		t0 := time.AfterFunc(time.Until(winFrom), func() {
			readCPU(&cpu0)
			if sm != nil {
				sm.setPhase("measure")
			}
		})
		t1 := time.AfterFunc(time.Until(winTo), func() {
			readCPU(&cpu1)
			if sm != nil {
				sm.setPhase("drain")
			}
		})
		if sm != nil {
			sm.setPhase("warmup")
		}
		if prod != nil {
			say("producing %.0f events/s for %v (+%v warmup)", cfg.Rate, cfg.Duration, cfg.Warmup)
			res := prod.runRate(ctx, cfg.Rate, winTo)
			prod.flush(ctx, &res)
			rep.Produce.Pace = res
			expect = prod.expect()
		} else {
			say("idle for %v (+%v warmup)", cfg.Duration, cfg.Warmup)
			sleepCtx(ctx, time.Until(winTo))
		}
		sleepCtx(ctx, time.Until(winTo)+10*time.Millisecond)
		t0.Stop()
		if t1.Stop() {
			// Not yet run (a loaded machine can delay a timer past the
			// 10 ms above): without this read the relay's CPU over the
			// window came out negative.
			readCPU(&cpu1)
		}
	case "burst":
		winFrom = time.Now()
		winTo = time.Unix(0, math.MaxInt64)
		setWindow(winFrom.UnixNano(), math.MaxInt64)
		readCPU(&cpu0)
		if sm != nil {
			sm.setPhase("burst")
		}
		say("producing a burst of %d events", cfg.Burst)
		res := prod.runBurst(ctx, cfg.Burst)
		prod.flush(ctx, &res)
		rep.Produce.Pace = res
		expect = prod.expect()
	}

	// Wait for the viewers to have everything, then end the run.
	deadline := time.Now().Add(cfg.Drain)
	if expect != nil {
		say("waiting up to %v for every viewer to receive all %d events", cfg.Drain, sum(expect))
		for time.Now().Before(deadline) && ctx.Err() == nil {
			if st := statusAll(expect); st.Complete == st.Live {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	doneAt := time.Now()
	if cfg.mode() == "burst" {
		readCPU(&cpu1) // at most one 20 ms poll after the last frame
	}
	parentSecs := 0.0
	if nproc > 1 {
		parentSecs = parentCPU.secs()
	}
	rs := make([]*groupReport, len(groups))
	if err := each(groups, func(i int, g group) error {
		r, err := g.finish(expect, deadline)
		rs[i] = r
		return err
	}); err != nil {
		return rep, err
	}
	all := &groupReport{}
	for _, r := range rs {
		mergeReports(all, r)
	}
	all.Connect = total.Connect
	all.ToolCPUSecs += parentSecs
	var samples []sample
	if sm != nil {
		samples = sm.stop()
	}
	cpuMu.Lock()
	cpuUsed := usage{cpu: cpu1.cpu - cpu0.cpu, writes: cpu1.writes - cpu0.writes}
	cpuMu.Unlock()
	rep.finish(cfg, all, expect, winFrom, winTo, doneAt, cpuUsed, samples, start)
	say("done")
	return rep, nil
}

// each calls f for every group at once and returns the first error.
func each(groups []group, f func(int, group) error) error {
	errs := make([]error, len(groups))
	var wg sync.WaitGroup
	for i, g := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i, g)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func sleepCtx(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

func sum(v []int64) int64 {
	var s int64
	for _, x := range v {
		s += x
	}
	return s
}
