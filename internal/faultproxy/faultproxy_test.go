package faultproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// echoServer answers every line with the same line.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func newProxy(t *testing.T) *Proxy {
	t.Helper()
	p, err := New(echoServer(t))
	if err != nil {
		t.Fatalf("New error = %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

type conn struct {
	net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, p *Proxy) *conn {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatalf("Dial error = %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &conn{c, bufio.NewReader(c)}
}

// roundTrip sends line and reads the answer, waiting at most d.
func (c *conn) roundTrip(line string, d time.Duration) (string, error) {
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		return "", err
	}
	_ = c.SetReadDeadline(time.Now().Add(d))
	got, err := c.r.ReadString('\n')
	if len(got) > 0 {
		got = got[:len(got)-1]
	}
	return got, err
}

func TestForwards(t *testing.T) {
	p := newProxy(t)
	c := dial(t, p)
	for _, msg := range []string{"a", "hello", "third"} {
		if got, err := c.roundTrip(msg, 5*time.Second); err != nil || got != msg {
			t.Fatalf("roundTrip(%q) = %q, %v; want %q", msg, got, err, msg)
		}
	}
}

func TestPauseHoldsAndResumeDelivers(t *testing.T) {
	p := newProxy(t)
	c := dial(t, p)
	if _, err := c.roundTrip("before", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	p.Pause()
	p.Pause() // idempotent
	_, err := c.roundTrip("held", 100*time.Millisecond)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("roundTrip while paused error = %v; want a timeout (no answer, no close)", err)
	}
	// A connection made while paused is accepted but silent too.
	c2 := dial(t, p)
	if _, err := c2.roundTrip("new", 100*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("new connection while paused error = %v; want a timeout", err)
	}
	p.Resume()
	p.Resume() // idempotent
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := c.r.ReadString('\n'); err != nil || got != "held\n" {
		t.Fatalf("after Resume read %q, %v; want the held line", got, err)
	}
	_ = c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := c2.r.ReadString('\n'); err != nil || got != "new\n" {
		t.Fatalf("after Resume, new connection read %q, %v; want its line", got, err)
	}
}

func TestKillAll(t *testing.T) {
	p := newProxy(t)
	c := dial(t, p)
	if _, err := c.roundTrip("x", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	p.KillAll()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.r.ReadString('\n'); !errors.Is(err, io.EOF) {
		t.Fatalf("read after KillAll error = %v; want EOF", err)
	}
	// The proxy still accepts.
	c2 := dial(t, p)
	if got, err := c2.roundTrip("y", 5*time.Second); err != nil || got != "y" {
		t.Fatalf("roundTrip after KillAll = %q, %v; want y", got, err)
	}
}

func TestRefuse(t *testing.T) {
	p := newProxy(t)
	open := dial(t, p)
	if _, err := open.roundTrip("x", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	p.Refuse(true)
	c := dial(t, p)
	if _, err := c.roundTrip("y", 5*time.Second); err == nil {
		t.Fatalf("roundTrip through a refusing proxy succeeded")
	}
	if got, err := open.roundTrip("still", 5*time.Second); err != nil || got != "still" {
		t.Fatalf("open connection after Refuse = %q, %v; want it unaffected", got, err)
	}
	p.Refuse(false)
	c3 := dial(t, p)
	if got, err := c3.roundTrip("z", 5*time.Second); err != nil || got != "z" {
		t.Fatalf("roundTrip after Refuse(false) = %q, %v; want z", got, err)
	}
	if n := p.Accepted(); n != 3 {
		t.Errorf("Accepted() = %d; want 3", n)
	}
}

func TestCloseWhilePaused(t *testing.T) {
	p := newProxy(t)
	c := dial(t, p)
	if _, err := c.roundTrip("x", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	p.Pause()
	_, _ = c.Write([]byte("held\n"))
	done := make(chan error, 1)
	go func() { done <- p.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Close() error = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close() of a paused proxy hangs")
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close() error = %v; want nil", err)
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Errorf("Dial after Close succeeded")
	}
}
