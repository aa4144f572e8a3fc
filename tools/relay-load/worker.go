//go:build linux

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"time"
)

// A worker is this same program re-executed with --worker: it runs a share
// of the viewers and answers the parent's requests, one JSON object a line
// on stdin and stdout. Its stderr is the parent's.

type message struct {
	Op       string         `json:"op"`
	Spec     *groupSpec     `json:"spec,omitempty"`
	From     int64          `json:"from,omitempty"`
	To       int64          `json:"to,omitempty"`
	Expect   []int64        `json:"expect,omitempty"`
	Deadline int64          `json:"deadline,omitempty"`
	Connect  *connectResult `json:"connect,omitempty"`
	Status   *groupStatus   `json:"status,omitempty"`
	Report   *groupReport   `json:"report,omitempty"`
	Err      string         `json:"err,omitempty"`
}

// remoteGroup is the parent's handle on a worker process.
type remoteGroup struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	enc  *json.Encoder
	dec  *json.Decoder
	mu   sync.Mutex
	spec groupSpec
	done chan struct{}
}

func startWorker(spec groupSpec, stderr io.Writer) (*remoteGroup, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "--worker")
	cmd.Stderr = stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	r := &remoteGroup{cmd: cmd, in: in, enc: json.NewEncoder(in), dec: json.NewDecoder(bufio.NewReader(out)), spec: spec, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(r.done) }()
	return r, nil
}

func (r *remoteGroup) call(req message) (*message, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.enc.Encode(req); err != nil {
		return nil, fmt.Errorf("worker %d-%d: %w", r.spec.Lo, r.spec.Hi, err)
	}
	var resp message
	if err := r.dec.Decode(&resp); err != nil {
		return nil, fmt.Errorf("worker %d-%d: %w", r.spec.Lo, r.spec.Hi, err)
	}
	if resp.Err != "" {
		return nil, fmt.Errorf("worker %d-%d: %s", r.spec.Lo, r.spec.Hi, resp.Err)
	}
	return &resp, nil
}

func (r *remoteGroup) connect(context.Context) (*connectResult, error) {
	m, err := r.call(message{Op: "connect", Spec: &r.spec})
	if err != nil {
		return nil, err
	}
	return m.Connect, nil
}

func (r *remoteGroup) status(expect []int64) (*groupStatus, error) {
	m, err := r.call(message{Op: "status", Expect: expect})
	if err != nil {
		return nil, err
	}
	return m.Status, nil
}

func (r *remoteGroup) window(from, to int64) error {
	_, err := r.call(message{Op: "window", From: from, To: to})
	return err
}

func (r *remoteGroup) finish(expect []int64, deadline time.Time) (*groupReport, error) {
	m, err := r.call(message{Op: "finish", Expect: expect, Deadline: deadline.UnixNano()})
	if err != nil {
		return nil, err
	}
	return m.Report, nil
}

// close ends the worker: it exits when its stdin closes; a worker still
// there after 10 s is killed.
func (r *remoteGroup) close() {
	_ = r.in.Close()
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.done
	}
}

// runWorker serves the parent until finish, stdin's end or the time limit.
func runWorker(stdin io.Reader, stdout io.Writer) error {
	dec := json.NewDecoder(bufio.NewReader(stdin))
	enc := json.NewEncoder(stdout)
	var first message
	if err := dec.Decode(&first); err != nil {
		return fmt.Errorf("worker: read spec: %w", err)
	}
	if first.Op != "connect" || first.Spec == nil {
		return errors.New("worker: first request must be connect")
	}
	g, err := newLocalGroup(*first.Spec)
	if err != nil {
		_ = enc.Encode(message{Err: err.Error()})
		return err
	}
	defer g.close()
	// The parent may die without closing stdin: the run's own limit ends us.
	limit := time.AfterFunc(first.Spec.Cfg.maxRuntime()+time.Minute, func() {
		fmt.Fprintln(os.Stderr, "relay-load worker: time limit reached, exiting")
		os.Exit(3)
	})
	defer limit.Stop()
	res, err := g.connect(context.Background())
	if err != nil {
		return enc.Encode(message{Err: err.Error()})
	}
	if err := enc.Encode(message{Op: "connect", Connect: res}); err != nil {
		return err
	}
	for {
		var m message
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		var resp message
		resp.Op = m.Op
		switch m.Op {
		case "status":
			resp.Status, _ = g.status(m.Expect)
		case "window":
			_ = g.window(m.From, m.To)
		case "finish":
			resp.Report, _ = g.finish(m.Expect, time.Unix(0, m.Deadline))
		default:
			resp.Err = "unknown op " + m.Op
		}
		if err := enc.Encode(resp); err != nil {
			return err
		}
		if m.Op == "finish" {
			return nil
		}
	}
}
