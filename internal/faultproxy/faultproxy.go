// Package faultproxy is a TCP proxy for fault-injection tests. A test puts
// it between a client and a server (Redis, Postgres) and then makes the
// link misbehave the ways real networks do:
//
//   - [Proxy.Pause] stops forwarding in both directions but keeps every
//     connection open: a half-open or stalled link that TCP does not
//     report. [Proxy.Resume] forwards again, including what was held.
//   - [Proxy.KillAll] closes every connection, as a server restart or a
//     CLIENT KILL would.
//   - [Proxy.Refuse] closes new connections as soon as they are accepted,
//     as a server that is down would.
//
// It is for tests only: it listens on 127.0.0.1, and all its methods are
// safe for concurrent use.
//
//	p, err := faultproxy.New("127.0.0.1:6379")
//	...
//	defer p.Close()
//	client := redis.NewClient(&redis.Options{Addr: p.Addr()})
//	p.Pause()
package faultproxy

import (
	"net"
	"sync"
)

// Proxy forwards TCP connections from its own address to a target.
type Proxy struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup // the accept loop and every pipe

	mu      sync.Mutex // guards the fields below
	conns   map[*pair]struct{}
	gate    chan struct{} // closed while forwarding; open while paused
	refuse  bool
	closed  bool
	accepts int
}

// pair is one proxied connection: the client's and ours to the target.
type pair struct {
	client, server net.Conn
	once           sync.Once
	done           chan struct{} // closed when the pair is closed
}

func (p *pair) close() {
	p.once.Do(func() {
		close(p.done)
		_ = p.client.Close()
		_ = p.server.Close()
	})
}

// New starts a proxy to target (host:port) on a free port of 127.0.0.1.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, conns: make(map[*pair]struct{}), gate: make(chan struct{})}
	close(p.gate)
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr returns the address clients should dial.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Accepted returns how many connections the proxy has accepted, refused
// ones included.
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepts
}

// Pause stops forwarding in both directions. Connections stay open, new
// ones are accepted, and bytes read before or during the pause are held
// until Resume.
func (p *Proxy) Pause() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.gate:
		p.gate = make(chan struct{})
	default: // already paused
	}
}

// Resume forwards again after Pause.
func (p *Proxy) Resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.gate:
	default:
		close(p.gate)
	}
}

// KillAll closes every open connection, on both sides. New connections are
// accepted as usual.
func (p *Proxy) KillAll() {
	p.mu.Lock()
	pairs := make([]*pair, 0, len(p.conns))
	for c := range p.conns {
		pairs = append(pairs, c)
	}
	p.mu.Unlock()
	for _, c := range pairs {
		c.close()
	}
}

// Refuse sets whether new connections are closed as soon as they are
// accepted. Open connections are not affected.
func (p *Proxy) Refuse(refuse bool) {
	p.mu.Lock()
	p.refuse = refuse
	p.mu.Unlock()
}

// Close stops the proxy, closes every connection and waits for its
// goroutines. It is safe to call more than once.
func (p *Proxy) Close() error {
	p.mu.Lock()
	already := p.closed
	p.closed = true
	p.mu.Unlock()
	if already {
		return nil
	}
	err := p.ln.Close()
	p.KillAll()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		p.mu.Lock()
		p.accepts++
		refuse, closed := p.refuse, p.closed
		p.mu.Unlock()
		if refuse || closed {
			_ = client.Close()
			continue
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = client.Close()
			continue
		}
		c := &pair{client: client, server: server, done: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.close()
			continue
		}
		p.conns[c] = struct{}{}
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(c, client, server)
		go p.pipe(c, server, client)
	}
}

// pipe copies from src to dst, holding data while the proxy is paused, and
// closes the pair when either side ends.
func (p *Proxy) pipe(c *pair, src, dst net.Conn) {
	defer p.wg.Done()
	defer func() {
		c.close()
		p.mu.Lock()
		delete(p.conns, c)
		p.mu.Unlock()
	}()
	buf := make([]byte, 32<<10)
	for {
		// Wait before reading too, so that a paused link also stops
		// draining its sender's socket: the sender's writes pile up in
		// the kernel, as on a stalled network.
		if !p.wait(c) {
			return
		}
		n, err := src.Read(buf)
		if n > 0 {
			if !p.wait(c) {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return // EOF or a closed connection: end both directions
		}
	}
}

// wait blocks while the proxy is paused. It reports false if the pair was
// closed meanwhile.
func (p *Proxy) wait(c *pair) bool {
	p.mu.Lock()
	gate := p.gate
	p.mu.Unlock()
	select {
	case <-gate:
		return true
	case <-c.done:
		return false
	}
}
