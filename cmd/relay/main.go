// Command relay reads identity events from Kafka and serves them to browsers
// over Server-Sent Events. Run it with --help for every setting, or with
// --demo to try it with nothing else installed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/decnet/identity-relay/internal/config"
	"github.com/decnet/identity-relay/internal/demo"
	"github.com/decnet/identity-relay/internal/store"
	"github.com/decnet/identity-relay/pkg/api"
	"github.com/decnet/identity-relay/pkg/consumer"
	"github.com/decnet/identity-relay/pkg/fanout"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.Is(err, config.ErrInvalid):
		fmt.Fprintln(os.Stderr, "relay:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "relay:", err)
		os.Exit(1)
	}
}

const (
	// historyReads, historyMaxRecords and historyMaxBytes bound reading
	// resume gaps back from Kafka: reads at once (one per user), and records
	// and bytes (of record values, and of the frames made of them) per read.
	// A longer gap gets a snapshot. See RELIABILITY.md for the memory bound.
	// authCacheTTL is how long user rows and revocations are cached:
	// CONTRACT.md allows 10 s, and a revocation reaches open streams within it.
	authCacheTTL      = 10 * time.Second
	historyReads      = 4
	historyMaxRecords = 100_000
	historyMaxBytes   = fanout.DefaultReadBackBytes
)

// run starts the relay and blocks until ctx ends, then shuts down within
// the configured timeout (`relay check-stream` runs the helm test's check). Logs go to stderr; the demo's URL goes to stdout.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "check-stream" {
		return checkStream(ctx, args[1:], getenv, stdout, stderr)
	}
	cfg, err := config.Load(args, getenv, stdout)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	b, err := openBackends(cfg, log)
	if err != nil {
		return err
	}
	defer b.close()
	st, brokers, secret, dm := b.store, b.brokers, b.secret, b.demo

	hub := fanout.New(fanout.Options{
		Buffer: cfg.SubscriberBuffer, WindowEvents: cfg.ReplayWindow, WindowBytes: cfg.ReplayWindowBytes,
		FlushInterval: cfg.FlushInterval, ReadBackBytes: historyMaxBytes,
	})
	registerFanoutMetrics(reg, hub)
	consCfg := consumer.Config{
		Brokers: brokers, TopicsRegex: cfg.TopicsRegex, MaxRecordBytes: cfg.MaxRecordBytes,
		Backfill: cfg.ReplayWindow, Logger: log, Registerer: reg,
	}
	cons, err := consumer.New(consCfg, hub)
	if err != nil {
		return err
	}
	history := consumer.NewHistory(consCfg, historyReads, historyMaxRecords, historyMaxBytes)
	defer history.Close()
	srv, err := api.New(api.Config{
		JWTSecret: []byte(secret), JWTIssuer: cfg.JWTIssuer, JWTAudience: cfg.JWTAudience, JWTLeeway: cfg.JWTLeeway,
		MaxPerUser: cfg.MaxPerUser, MaxConnections: cfg.MaxConnections,
		Keepalive: cfg.Keepalive, Retry: cfg.Retry, SnapshotLimit: cfg.SnapshotLimit,
		MaxLifetime: cfg.MaxLifetime, LifetimeJitter: cfg.LifetimeJitter,
		DBTimeout: cfg.DatabaseTimeout, WriteTimeout: cfg.WriteTimeout, SendBuffer: cfg.SendBuffer, AuthCacheTTL: authCacheTTL,
		UserTimeout: cfg.UserTimeout, TrustedProxies: cfg.TrustedProxies,
		Logger: log, Registerer: reg, Gatherer: reg, ConsumerReady: cons.Ready,
		History: history, ReadBacks: historyReads,
		Peers: cfg.Peers, RebalanceInterval: cfg.RebalanceInterval, RebalanceTolerance: cfg.RebalanceTol,
	}, st, hub)
	if err != nil {
		return err
	}
	if cfg.Demo {
		srv.Handler().GET("/", gin.WrapF(demo.Page))
	}

	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.ListenAddr, err)
	}
	httpSrv := srv.HTTPServer()

	consCtx, stopConsumer := context.WithCancel(context.Background())
	consDone := make(chan error, 1)
	go func() { consDone <- cons.Run(consCtx) }()
	serveErr := make(chan error, 1)
	go func() { serveErr <- httpSrv.Serve(ln) }()
	// Rebalancing stops before the shutdown begins: a draining replica
	// moves all its viewers anyway.
	rebalCtx, stopRebalance := context.WithCancel(ctx)
	defer stopRebalance()
	go srv.Rebalance(rebalCtx)

	log.Info("relay listening", "addr", ln.Addr().String(), "demo", cfg.Demo)
	if dm != nil {
		pubCtx, stopPub := context.WithCancel(ctx)
		defer stopPub()
		go func() { _ = dm.Publish(pubCtx, time.Second) }()
		base := "http://" + displayAddr(ln.Addr())
		fmt.Fprintf(stdout, "Demo relay is up.\nOpen the live page: %s/?token=%s\nStream: %s%s?token=%s\n",
			base, dm.Token, base, api.EventsPath, dm.Token)
	}

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		stopConsumer()
		<-consDone
		return fmt.Errorf("http server: %w", err)
	case err := <-consDone:
		stopConsumer()
		_ = httpSrv.Close()
		return fmt.Errorf("kafka consumer stopped: %w", err)
	}

	shutdown(log, cfg.ShutdownTimeout, cfg.ShutdownSpread, srv, hub, httpSrv)
	stopConsumer()
	<-consDone
	log.Info("stopped")
	return nil
}

// shutdown turns the relay unready, refuses new viewers, ends every stream
// between frames (one by one over spread, if not 0, the consumer still
// feeding the streams not yet ended) and the remaining requests, within
// timeout.
func shutdown(log *slog.Logger, timeout, spread time.Duration, srv *api.Server, hub *fanout.Broadcaster, httpSrv *http.Server) {
	log.Info("shutting down", "timeout", timeout.String(), "spread", spread.String())
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	srv.Drain()
	if spread > 0 {
		srv.Spread(ctx, spread)
	}
	_ = hub.Close()
	if err := srv.Wait(ctx); err != nil {
		log.Warn("streams still open at the shutdown timeout; closed them", "err", err)
	}
	if err := httpSrv.Shutdown(ctx); err != nil {
		log.Warn("requests still in progress at the shutdown timeout; closing them", "err", err)
		_ = httpSrv.Close()
	}
}

// backends are where the relay reads users and identities, and Kafka: the
// configured ones, or the demo's own.
type backends struct {
	store   api.Store
	brokers []string
	secret  string
	demo    *demo.Demo // nil outside demo mode
	close   func()
}

func openBackends(cfg *config.Config, log *slog.Logger) (*backends, error) {
	if cfg.Demo {
		dm, err := demo.Start(log)
		if err != nil {
			return nil, err
		}
		return &backends{store: dm.Store(), brokers: dm.Brokers(), secret: dm.Secret, demo: dm, close: dm.Close}, nil
	}
	pg, err := store.Open(cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	return &backends{store: pg, brokers: cfg.KafkaBrokers, secret: cfg.JWTSecret, close: func() { _ = pg.Close() }}, nil
}

func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// registerFanoutMetrics exposes the broadcaster's running totals.
func registerFanoutMetrics(reg prometheus.Registerer, hub *fanout.Broadcaster) {
	reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "relay_events_published_total", Help: "Events encoded once and offered to every viewer.",
		}, func() float64 { return float64(hub.Stats().Published) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "relay_frames_delivered_total", Help: "Frames placed in a viewer's queue.",
		}, func() float64 { return float64(hub.Stats().Delivered) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "relay_replay_window_events", Help: "Events held in the replay window.",
		}, func() float64 { return float64(hub.Stats().WindowEvents) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "relay_replay_window_bytes", Help: "Bytes of frames held in the replay window.",
		}, func() float64 { return float64(hub.Stats().WindowBytes) }),
	)
}

// displayAddr turns a wildcard listen address into one a browser can open.
func displayAddr(a net.Addr) string {
	if tcp, ok := a.(*net.TCPAddr); ok && tcp.IP.IsUnspecified() {
		return fmt.Sprintf("localhost:%d", tcp.Port)
	}
	return a.String()
}
