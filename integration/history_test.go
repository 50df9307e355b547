package integration

import (
	"strings"
	"testing"
	"time"
)

// ms is a time in a hand-made history.
func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

// Helpers that build the operations of hand-made histories.
func put(node, key string, start, end int, version int64, value string) Op {
	return Op{Node: node, Kind: KindPut, Key: key, Arg: value, Start: ms(start), End: ms(end), Outcome: OK, Status: 200, Found: true, Value: value, Version: version}
}

func read(node, key string, start, end int, version int64, value string) Op {
	return Op{Node: node, Kind: KindGet, Key: key, Start: ms(start), End: ms(end), Outcome: OK, Status: 200, Found: true, Value: value, Version: version}
}

func read404(node, key string, start, end int) Op {
	return Op{Node: node, Kind: KindGet, Key: key, Start: ms(start), End: ms(end), Outcome: OK, Status: 404}
}

func del(node, key string, start, end int) Op {
	return Op{Node: node, Kind: KindDelete, Key: key, Start: ms(start), End: ms(end), Outcome: OK, Status: 204}
}

func sqlPut(key string, start, end int, version int64, value string) Op {
	return Op{Node: SQLNode, Kind: KindSQLUpsert, Key: key, Arg: value, Start: ms(start), End: ms(end), Outcome: OK, Found: true, Value: value, Version: version}
}

func sqlDel(key string, start, end int, tombstone int64) Op {
	return Op{Node: SQLNode, Kind: KindSQLDelete, Key: key, Start: ms(start), End: ms(end), Outcome: OK, Version: tombstone}
}

func add(node, key string, start, end int, delta string, out Outcome, version int64, value string) Op {
	o := Op{Node: node, Kind: KindAdd, Key: key, Arg: delta, Start: ms(start), End: ms(end), Outcome: out}
	if out == OK {
		o.Status, o.Found, o.Version, o.Value = 200, true, version, value
	}
	return o
}

func with(o Op, f func(*Op)) Op { f(&o); return o }

func number(ops ...Op) []Op {
	for i := range ops {
		ops[i].ID = i + 1
	}
	return ops
}

func TestCheck(t *testing.T) {
	b := Bounds{API: ms(100), SQL: ms(300)}
	tests := []struct {
		name string
		ops  []Op
		want []string // the rules violated, in order; empty: none
	}{
		{"fresh reads", number(
			put("n1", "k", 0, 10, 1, "a"),
			read("n1", "k", 11, 12, 1, "a"),
			read("n2", "k", 200, 201, 1, "a"),
		), nil},
		{"stale read on another node within the bound", number(
			put("n1", "k", 0, 10, 1, "a"),
			put("n1", "k", 20, 30, 2, "b"),
			read("n2", "k", 50, 51, 1, "a"),
		), nil},
		{"G2: stale read on another node past the bound", number(
			put("n1", "k", 0, 10, 1, "a"),
			put("n1", "k", 20, 30, 2, "b"),
			read("n2", "k", 131, 132, 1, "a"),
		), []string{"G2"}},
		{"G1: stale read on the writer's node", number(
			put("n1", "k", 0, 10, 1, "a"),
			put("n1", "k", 20, 30, 2, "b"),
			read("n1", "k", 31, 32, 1, "a"),
		), []string{"G1"}},
		{"a read overlapping the write may see either", number(
			put("n1", "k", 0, 10, 1, "a"),
			put("n1", "k", 20, 30, 2, "b"),
			read("n1", "k", 25, 35, 1, "a"),
		), nil},
		{"G2: 404 after the first write returned", number(
			put("n1", "k", 0, 10, 1, "a"),
			read404("n2", "k", 200, 201),
		), []string{"G2"}},
		{"404 before any write", number(
			read404("n2", "k", 0, 1),
			put("n1", "k", 5, 10, 1, "a"),
		), nil},
		{"unknown writes oblige nothing", number(
			put("n1", "k", 0, 10, 1, "a"),
			with(put("n1", "k", 20, 30, 2, "b"), func(o *Op) { o.Outcome, o.Found, o.Version = Unknown, false, 0 }),
			read("n1", "k", 500, 501, 1, "a"),
		), nil},
		{"a read may see an unknown write", number(
			put("n1", "k", 0, 10, 1, "a"),
			with(put("n1", "k", 20, 30, 0, ""), func(o *Op) { o.Outcome, o.Found = Unknown, false }),
			read("n2", "k", 500, 501, 2, "b"),
		), nil},
		{"G2: found after a delete returned", number(
			put("n1", "k", 0, 10, 1, "a"),
			del("n2", "k", 20, 30),
			read("n3", "k", 131, 132, 1, "a"),
			read404("n1", "k", 140, 141),
		), []string{"G2"}},
		{"404 after a delete", number(
			put("n1", "k", 0, 10, 1, "a"),
			del("n2", "k", 20, 30),
			read404("n1", "k", 25, 31),
			read404("n3", "k", 200, 201),
		), nil},
		{"outside write: stale within its bound", number(
			sqlPut("k", 0, 10, 1, "a"),
			sqlPut("k", 20, 30, 2, "b"),
			read("n2", "k", 250, 251, 1, "a"),
		), nil},
		{"G2: outside write past its bound", number(
			sqlPut("k", 0, 10, 1, "a"),
			sqlPut("k", 20, 30, 2, "b"),
			read("n2", "k", 331, 332, 1, "a"),
		), []string{"G2"}},
		{"outside delete and insert: versions keep growing", number(
			sqlPut("k", 0, 10, 1, "a"),
			sqlDel("k", 20, 30, 2),
			read404("n1", "k", 400, 401),
			sqlPut("k", 500, 510, 3, "c"),
			read("n1", "k", 900, 901, 3, "c"),
		), nil},
		{"G2: found after an outside delete", number(
			sqlPut("k", 0, 10, 1, "a"),
			sqlDel("k", 20, 30, 2),
			read("n1", "k", 400, 401, 1, "a"),
		), []string{"G2"}},
		{"G2: 404 after an outside insert that followed the delete", number(
			sqlPut("k", 0, 10, 1, "a"),
			sqlDel("k", 20, 30, 2),
			sqlPut("k", 40, 50, 3, "c"),
			read404("n1", "k", 400, 401),
		), []string{"G2"}},
		{"versions: two values at one version", number(
			put("n1", "k", 0, 10, 1, "a"),
			read("n2", "k", 20, 21, 1, "b"),
		), []string{"versions"}},
		{"versions: two writes acknowledged with one version", number(
			add("n1", "k", 0, 10, "1", OK, 1, "1"),
			add("n2", "k", 0, 10, "1", OK, 1, "1"),
		), []string{"versions"}},
		{"keys are independent", number(
			put("n1", "k", 0, 10, 5, "a"),
			read("n1", "j", 20, 21, 1, "x"),
		), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := Check(tt.ops, b)
			var got []string
			for _, v := range res.Violations {
				got = append(got, v.Rule)
			}
			if strings.Join(got, ",") != strings.Join(tt.want, ",") {
				for _, v := range res.Violations {
					t.Log(ExplainAround(tt.ops, v, time.Second))
				}
				t.Errorf("Check() violations = %v; want %v", got, tt.want)
			}
		})
	}
}

func TestCheckLag(t *testing.T) {
	ops := number(
		put("n1", "k", 0, 10, 1, "a"),
		put("n1", "k", 20, 30, 2, "b"),
		put("n1", "k", 40, 50, 3, "c"),
		read("n2", "k", 90, 91, 1, "a"), // behind #2 (returned at 30) by 60ms
		read("n2", "k", 95, 96, 3, "c"),
		sqlPut("j", 0, 10, 1, "x"),
		sqlPut("j", 20, 30, 2, "y"),
		read("n2", "j", 230, 231, 1, "x"),
	)
	res := Check(ops, Bounds{API: time.Second, SQL: time.Second})
	if len(res.Violations) != 0 {
		t.Fatalf("Check() violations = %v; want none", res.Violations)
	}
	if res.Reads != 3 || res.Stale != 2 || res.MaxLagAPI != ms(60) || res.MaxLagSQL != ms(200) {
		t.Errorf("Check() = reads %d stale %d lag %v / %v; want 3, 2, 60ms, 200ms", res.Reads, res.Stale, res.MaxLagAPI, res.MaxLagSQL)
	}
}

func TestCheckAdds(t *testing.T) {
	ops := number(
		add("n1", "a", 0, 10, "2", OK, 1, "2"),
		add("n2", "a", 0, 20, "3", OK, 2, "5"),
		add("n3", "a", 5, 5000, "4", Unknown, 0, ""),
		add("n3", "a", 30, 40, "5", Failed, 0, ""),
	)
	tests := []struct {
		name  string
		final Row
		want  int // violations
	}{
		{"without the unknown add", Row{Found: true, Value: "5", Version: 2}, 0},
		{"with the unknown add", Row{Found: true, Value: "9", Version: 3}, 0},
		{"an acknowledged add lost", Row{Found: true, Value: "3", Version: 1}, 2},
		{"a failed add applied", Row{Found: true, Value: "14", Version: 4}, 2},
		{"value right, version wrong", Row{Found: true, Value: "5", Version: 7}, 1},
		{"missing row", Row{}, 2},
		{"not a number", Row{Found: true, Value: "x", Version: 2}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vs := CheckAdds(ops, []string{"a"}, map[string]Row{"a": tt.final})
			if len(vs) != tt.want {
				t.Errorf("CheckAdds(final %v) = %v; want %d violations", tt.final, vs, tt.want)
			}
		})
	}
}

func TestExplain(t *testing.T) {
	ops := number(
		put("n1", "k", 0, 10, 1, "a"),
		put("n1", "k", 20, 30, 2, "b"),
		read("n2", "j", 40, 41, 7, "other key"),
		read("n2", "k", 131, 132, 1, "a"),
	)
	res := Check(ops, Bounds{API: ms(100)})
	if len(res.Violations) != 1 {
		t.Fatalf("Check() violations = %v; want 1", res.Violations)
	}
	got := ExplainAround(ops, res.Violations[0], time.Second)
	for _, want := range []string{
		`G2 on key "k": read #4 on n2 saw v1 "a", but write #2 (put on n1 → v2 "b") had returned 101ms before the read started (bound 100ms)`,
		` >  #2 `, ` >  #4 `, `#1 `,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Explain() = \n%s\nwant it to contain %q", got, want)
		}
	}
	if strings.Contains(got, "other key") {
		t.Errorf("Explain() = \n%s\nshows another key's operation", got)
	}
	t.Logf("what a violation looks like:\n%s", got)
}

func TestExplainByKey(t *testing.T) {
	ops := number(
		put("n1", "k", 0, 10, 1, "a"),
		put("n1", "k", 20, 30, 2, "b"),
		read("n2", "k", 131, 132, 1, "a"),
		read("n3", "k", 140, 141, 1, "a"),
		put("n1", "j", 0, 10, 1, "x"),
		read("n1", "j", 20, 21, 0, ""),
	)
	ops[5].Found = false // a 404 after the put on its node: G1
	res := Check(ops, Bounds{API: ms(100)})
	got := explainByKey(ops, res.Violations, time.Second)
	if len(res.Violations) != 3 || len(got) != 2 {
		t.Fatalf("Check() = %v; explainByKey() = %d slices; want 3 violations in 2 slices", res.Violations, len(got))
	}
	for _, e := range got {
		if strings.Count(e, "\n    id ") != 1 || strings.Count(e, " >  ") < 2 {
			t.Errorf("explainByKey() slice =\n%s\nwant one table with the offending operations marked", e)
		}
	}
	k := got[1] // Check reports keys in order: j, k
	if !strings.Contains(k, "read #3 on n2") || !strings.Contains(k, "read #4 on n3") {
		t.Errorf("explainByKey() slice of k =\n%s\nwant both violations on k listed", k)
	}
}
