package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"time"
)

// The load generator speaks just enough HTTP/1.1 over keep-alive connections
// to send a GET and read a response with a Content-Length, which is what the
// server sends for these small bodies. It costs a fraction of net/http's
// client per request, so that less of the 2 cores goes to generating load
// (the server still shares them with it, and with Postgres and Redis).

// loadResult is what one measurement saw.
type loadResult struct {
	requests int64
	errors   int64
	elapsed  time.Duration
	latency  []time.Duration // of the successful requests
	firstErr error
}

// requests returns the request bytes for every key, in key order.
func requests(keys []string) [][]byte {
	reqs := make([][]byte, len(keys))
	for i, k := range keys {
		reqs[i] = []byte("GET /items/" + k + " HTTP/1.1\r\nHost: bench\r\n\r\n")
	}
	return reqs
}

// generate keeps conns connections to addr busy for d, each with one
// request at a time for a key drawn uniformly from reqs, and returns what
// they saw. seed varies the keys between measurements.
//
// With rate > 0 the load is paced instead: the connections together send
// rate requests per second, each on a fixed schedule of its own, and a
// request that is due while the previous one is still outstanding is sent
// as soon as that one returns. Latency runs from the moment a request is
// written, so it compares the variants at the same offered load rather
// than at saturation, where every closed-loop latency is mostly queueing
// for the two cores.
func generate(ctx context.Context, addr string, reqs [][]byte, conns int, d time.Duration, seed uint64, rate float64) loadResult {
	type workerResult struct {
		n, errs int64
		lat     []time.Duration
		err     error
	}
	results := make([]workerResult, conns)
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var wg sync.WaitGroup
	start := time.Now()
	var interval time.Duration // between one connection's requests; 0: closed loop
	if rate > 0 {
		interval = time.Duration(float64(conns) / rate * float64(time.Second))
	}
	for w := range conns {
		wg.Go(func() {
			next := start.Add(interval * time.Duration(w) / time.Duration(conns))
			var pace *time.Timer
			if interval > 0 {
				pace = time.NewTimer(time.Until(next))
				defer pace.Stop()
			}
			r := &results[w]
			r.lat = make([]time.Duration, 0, 1<<14)
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			var c *conn
			defer func() {
				if c != nil {
					c.close()
				}
			}()
			for ctx.Err() == nil {
				if c == nil {
					var err error
					if c, err = dial(ctx, addr); err != nil {
						if ctx.Err() == nil {
							r.errs++
							r.err = cmpErr(r.err, err)
						}
						continue
					}
				}
				if pace != nil {
					if wait := time.Until(next); wait > 0 {
						pace.Reset(wait)
						select {
						case <-pace.C:
						case <-ctx.Done():
							return
						}
					}
					next = next.Add(interval)
				}
				t0 := time.Now()
				status, err := c.do(reqs[rng.IntN(len(reqs))])
				lat := time.Since(t0)
				switch {
				case err != nil:
					c.close()
					c = nil
					if ctx.Err() == nil {
						r.errs++
						r.err = cmpErr(r.err, err)
					}
				case status != 200:
					r.errs++
					r.err = cmpErr(r.err, fmt.Errorf("status %d", status))
				default:
					r.n++
					r.lat = append(r.lat, lat)
				}
			}
		})
	}
	wg.Wait()
	res := loadResult{elapsed: time.Since(start)}
	for _, r := range results {
		res.requests += r.n
		res.errors += r.errs
		res.latency = append(res.latency, r.lat...)
		res.firstErr = cmpErr(res.firstErr, r.err)
	}
	return res
}

func cmpErr(old, err error) error {
	if old != nil {
		return old
	}
	return err
}

// conn is one keep-alive HTTP/1.1 connection.
type conn struct {
	nc net.Conn
	r  *bufio.Reader
}

func dial(ctx context.Context, addr string) (*conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	go func() {
		// Unblock a read in progress when the measurement ends.
		<-ctx.Done()
		nc.SetDeadline(time.Now())
	}()
	return &conn{nc: nc, r: bufio.NewReaderSize(nc, 4096)}, nil
}

func (c *conn) close() { c.nc.Close() }

var errFraming = errors.New("response without Content-Length")

// do sends req and reads the whole response; it returns the status code.
func (c *conn) do(req []byte) (int, error) {
	if _, err := c.nc.Write(req); err != nil {
		return 0, err
	}
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		return 0, err
	}
	// "HTTP/1.1 200 OK\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, fmt.Errorf("bad status line %q", line)
	}
	length := -1
	for {
		line, err := c.r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		if len(line) <= 2 { // the blank line
			break
		}
		if k, v, ok := bytes.Cut(line, []byte(":")); ok && bytes.EqualFold(k, []byte("Content-Length")) {
			if length, err = strconv.Atoi(string(bytes.TrimSpace(v))); err != nil {
				return 0, fmt.Errorf("bad Content-Length %q", v)
			}
		}
	}
	if length < 0 {
		return 0, errFraming
	}
	if _, err := c.r.Discard(length); err != nil {
		return 0, err
	}
	return status, nil
}
