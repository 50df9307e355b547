package backoff

import (
	"context"
	"errors"
	"math"
	"testing"
	"time"
)

func TestWaitBounds(t *testing.T) {
	p := Policy{Min: 10 * time.Millisecond, Max: time.Second}
	for n, b := range []time.Duration{10, 20, 40, 80, 160, 320, 640, 1000, 1000} {
		b *= time.Millisecond
		if n == 7 || n == 8 {
			b = time.Second
		}
		for range 200 {
			if d := p.Wait(n); d < b/2 || d > b {
				t.Fatalf("Wait(%d) = %v; want within [%v, %v]", n, d, b/2, b)
			}
		}
	}
	if d := p.Wait(-3); d < 5*time.Millisecond || d > 10*time.Millisecond {
		t.Errorf("Wait(-3) = %v; want as Wait(0)", d)
	}
	huge := Policy{Min: time.Duration(math.MaxInt64 / 3), Max: time.Duration(math.MaxInt64)}
	for _, n := range []int{1, 2, 62, 63, 64, 1 << 30} {
		if d := huge.Wait(n); d < huge.Max/2 && n > 1 || d <= 0 {
			t.Errorf("Wait(%d) of a huge policy = %v; want no overflow", n, d)
		}
	}
	if d := (Policy{Min: time.Second, Max: time.Millisecond}).Wait(5); d > time.Millisecond {
		t.Errorf("Wait with Min > Max = %v; want at most Max", d)
	}
	if d := (Policy{}).Wait(3); d != 0 {
		t.Errorf("Wait of a zero Policy = %v; want 0", d)
	}
}

func TestSleepEndsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour) {
		t.Error("Sleep with an ended context reported a full wait")
	}
	if !Sleep(context.Background(), time.Millisecond) {
		t.Error("Sleep of 1ms reported an interruption")
	}
}

func TestRetry(t *testing.T) {
	p := Policy{Min: time.Microsecond, Max: time.Microsecond}
	errAgain, errStop := errors.New("again"), errors.New("stop")
	again := func(err error) bool { return errors.Is(err, errAgain) }
	calls := 0
	err := p.Retry(context.Background(), 5, again, func(context.Context) error { calls++; return errAgain })
	if !errors.Is(err, errAgain) || calls != 5 {
		t.Errorf("Retry of a function that always fails = %v after %d calls; want errAgain after 5", err, calls)
	}
	calls = 0
	err = p.Retry(context.Background(), 5, again, func(context.Context) error {
		calls++
		if calls == 2 {
			return errStop
		}
		return errAgain
	})
	if !errors.Is(err, errStop) || calls != 2 {
		t.Errorf("Retry = %v after %d calls; want errStop after 2", err, calls)
	}
	calls = 0
	err = p.Retry(context.Background(), 0, again, func(context.Context) error { calls++; return nil })
	if err != nil || calls != 1 {
		t.Errorf("Retry with 0 attempts = %v after %d calls; want one call", err, calls)
	}
	ctx, cancel := context.WithCancel(context.Background())
	err = Policy{Min: time.Hour, Max: time.Hour}.Retry(ctx, 3, again, func(context.Context) error { cancel(); return errAgain })
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Retry whose context ends while it sleeps = %v; want context.Canceled", err)
	}
}
