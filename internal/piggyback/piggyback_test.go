package piggyback

import (
	"context"
	"testing"

	"github.com/redis/go-redis/v9"
)

// TestBoard: a Rider boards a pipeline only of its own *redis.Client, and
// only once; once boarded, its owner cannot take it, and the reverse.
func TestBoard(t *testing.T) {
	ctx := context.Background()
	mine := redis.NewClient(&redis.Options{Addr: "127.0.0.1:0"}) // never dialled
	other := redis.NewClient(&redis.Options{Addr: "127.0.0.1:0"})
	cluster := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:0"}})
	t.Cleanup(func() { mine.Close(); other.Close(); cluster.Close() })
	queued := 0
	queue := func(context.Context, redis.Pipeliner) func() { queued++; return func() {} }

	r := New(mine, queue)
	for _, c := range []redis.UniversalClient{other, cluster} {
		if f := r.Board(ctx, c, mine.Pipeline()); f != nil {
			t.Errorf("Board(%T) boarded a rider of another client", c)
		}
	}
	f := r.Board(ctx, mine, mine.Pipeline())
	if f == nil || queued != 1 {
		t.Fatalf("Board(own client): finish %t, queued %d; want a finish, 1", f != nil, queued)
	}
	if r.Board(ctx, mine, mine.Pipeline()) != nil || r.Take() {
		t.Error("a boarded rider boarded again or was taken by its owner")
	}
	f()
	select {
	case <-r.Done():
	default:
		t.Error("Done not closed after finish")
	}

	r = New(cluster, queue)
	if r.Board(ctx, cluster, cluster.Pipeline()) != nil {
		t.Error("a rider of a ClusterClient boarded")
	}
	r = New(mine, queue)
	if !r.Take() || r.Board(ctx, mine, mine.Pipeline()) != nil {
		t.Error("a rider its owner took boarded")
	}
	if From(With(ctx, r)) != r || From(ctx) != nil {
		t.Error("From(With(ctx, r)) != r, or From(ctx) != nil")
	}
}
