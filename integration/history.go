package integration

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Kind is what an operation of a history did.
type Kind string

// The kinds of operations. The first four go through a node's HTTP API;
// the SQL ones are outside writes made with a plain Postgres client.
const (
	KindGet       Kind = "get"
	KindPut       Kind = "put"
	KindAdd       Kind = "add"
	KindDelete    Kind = "delete"
	KindSQLUpsert Kind = "sql-put"
	KindSQLDelete Kind = "sql-del"
)

// SQLNode is the Node of outside writes.
const SQLNode = "sql"

func (k Kind) isWrite() bool { return k != KindGet }

// Outcome is what a client knows about an operation after it returned.
type Outcome int

const (
	// OK: a read returned an item or a 404; a write was acknowledged.
	OK Outcome = iota
	// Failed: the operation certainly had no effect (a failed read, a
	// write rejected before or by its transaction, such as by the fence).
	Failed
	// Unknown: a write that may or may not have committed (a timeout,
	// a lost connection, a 5xx after which the commit is in doubt).
	Unknown
)

func (o Outcome) String() string {
	switch o {
	case OK:
		return "ok"
	case Failed:
		return "fail"
	default:
		return "unknown"
	}
}

// Op is one operation of a history. Times are offsets from the history's
// origin on the test's monotonic clock: Start is taken before the request is
// sent and End after its response was read, so the server's own start and
// end lie inside [Start, End].
type Op struct {
	ID      int
	Node    string // the node's name, or SQLNode
	Kind    Kind
	Key     string
	Arg     string // the value of a put, the delta of an add
	Start   time.Duration
	End     time.Duration
	Outcome Outcome
	Status  int // HTTP status, 0 if none
	// Found reports that the item existed: the read returned it, or the
	// write left it in place. Value and Version are the item's then.
	Found   bool
	Value   string
	Version int64
	// Err is the error or the body of an error response.
	Err string
}

// fenced reports a write that the fence rejected: the webapp answers 503
// "write lost its lock and was fenced off, nothing written; retry".
func (o *Op) fenced() bool {
	return strings.Contains(o.Err, "fenced off") && strings.Contains(o.Err, "nothing written")
}

func (o Op) String() string {
	res := o.Outcome.String()
	switch {
	case o.Outcome == OK && o.Kind == KindDelete:
		res = "ok deleted"
	case o.Outcome == OK && o.Kind == KindSQLDelete:
		res = fmt.Sprintf("ok deleted (as v%d)", o.Version)
	case o.Outcome == OK && o.Found:
		res = fmt.Sprintf("ok v%d %q", o.Version, o.Value)
	case o.Outcome == OK:
		res = "ok 404"
	}
	arg := o.Arg
	if o.Kind == KindAdd {
		arg = "+" + arg
	} else if arg != "" {
		arg = strconv.Quote(arg)
	}
	s := fmt.Sprintf("#%-5d %-5s %-7s %-4s %-10s %9s → %-9s %s", o.ID, o.Node, o.Kind, o.Key, arg, fmtDur(o.Start), fmtDur(o.End), res)
	if o.Status != 0 && o.Status != 200 && o.Status != 204 && o.Status != 404 {
		s += fmt.Sprintf(" (HTTP %d)", o.Status)
	}
	if o.Err != "" && o.Outcome != OK {
		e := o.Err
		if len(e) > 120 {
			e = e[:120] + "…"
		}
		s += " " + e
	}
	return s
}

func fmtDur(d time.Duration) string { return fmt.Sprintf("%.3fs", d.Seconds()) }

// History records the operations of a test. It is safe for concurrent use.
type History struct {
	origin time.Time

	mu  sync.Mutex // guards ops
	ops []Op
}

// NewHistory returns an empty history whose clock starts now.
func NewHistory() *History { return &History{origin: time.Now()} }

// Now returns the time since the history's origin, on the monotonic clock.
func (h *History) Now() time.Duration { return time.Since(h.origin) }

// Add records op, gives it the next ID and returns it.
func (h *History) Add(op Op) Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	op.ID = len(h.ops) + 1
	h.ops = append(h.ops, op)
	return op
}

// Ops returns a copy of the operations recorded so far, in the order they
// were added.
func (h *History) Ops() []Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.ops)
}

// Bounds are the staleness bounds of G2 that a check applies: a read that
// starts later than a write's return plus the bound must see that write or
// a newer one. G1 (on the writer's own node) is checked with no bound.
type Bounds struct {
	// API bounds writes through a node (PUT, add, DELETE).
	API time.Duration
	// SQL bounds outside writes, which reach the caches through capture
	// triggers and the outbox relay.
	SQL time.Duration
}

// Violation is a broken guarantee found in a history.
type Violation struct {
	Rule string // "G1", "G2", "G6", "versions", "G3"
	Key  string
	Msg  string
	At   time.Duration // where in the history to look
	Ops  []int         // the offending operations' IDs
}

func (v Violation) String() string { return fmt.Sprintf("%s on key %q: %s", v.Rule, v.Key, v.Msg) }

// ExplainAround is Explain of the operations that overlap
// [v.At-window, v.At+window].
func ExplainAround(ops []Op, v Violation, window time.Duration) string {
	return Explain(ops, v, v.At-window, v.At+window)
}

// Explain formats v with the slice of history that shows it: every
// operation on v's key that overlaps [from, to], sorted by start, the
// offending ones marked with '>'.
func Explain(ops []Op, v Violation, from, to time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n  operations on %q overlapping %s…%s (seconds since the test began):\n", v, v.Key, fmtDur(from), fmtDur(to))
	var slice []Op
	for _, o := range ops {
		if o.Key == v.Key && (o.End >= from && o.Start <= to || slices.Contains(v.Ops, o.ID)) {
			slice = append(slice, o)
		}
	}
	sort.SliceStable(slice, func(i, j int) bool { return slice[i].Start < slice[j].Start })
	const limit = 80
	if len(slice) > limit {
		// Keep the offending operations and what surrounds them.
		keep := make([]Op, 0, limit)
		for i, o := range slice {
			near := false
			for _, id := range v.Ops {
				for j := max(0, i-4); j <= min(len(slice)-1, i+4); j++ {
					near = near || slice[j].ID == id
				}
			}
			if near {
				keep = append(keep, o)
			}
		}
		fmt.Fprintf(&b, "  (%d operations; showing those next to the offending ones)\n", len(slice))
		slice = keep
	}
	fmt.Fprintf(&b, "    %-6s %-5s %-7s %-4s %-10s %9s   %-9s %s\n", "id", "node", "op", "key", "arg", "start", "end", "result")
	for _, o := range slice {
		mark := "   "
		if slices.Contains(v.Ops, o.ID) {
			mark = " > "
		}
		b.WriteString(mark + " " + o.String() + "\n")
	}
	return b.String()
}

// explainByKey formats vs with one slice of history per key: the
// operations on the key from window before its first violation to window
// after its last, every offending one marked.
func explainByKey(ops []Op, vs []Violation, window time.Duration) []string {
	var keys []string
	byKey := map[string][]Violation{}
	for _, v := range vs {
		if _, ok := byKey[v.Key]; !ok {
			keys = append(keys, v.Key)
		}
		byKey[v.Key] = append(byKey[v.Key], v)
	}
	var out []string
	for _, k := range keys {
		group := byKey[k]
		all := Violation{Rule: group[0].Rule, Key: k, At: group[0].At}
		from, to := group[0].At, group[0].At
		var msgs []string
		for _, v := range group {
			msgs = append(msgs, v.String())
			all.Ops = append(all.Ops, v.Ops...)
			from, to = min(from, v.At), max(to, v.At)
		}
		e := Explain(ops, all, from-window, to+window)
		// Explain's first line is the combined violation; list them all.
		_, rest, _ := strings.Cut(e, "\n")
		out = append(out, strings.Join(msgs, "\n")+"\n"+rest)
	}
	return out
}

// CheckResult is what Check found, with figures for the test's log.
type CheckResult struct {
	Violations []Violation
	// Reads counts successful reads; Stale counts those that saw an older
	// state than a write that had returned before they started (legitimate
	// within the bounds).
	Reads, Stale int
	// MaxLagAPI and MaxLagSQL are the longest such staleness observed,
	// behind a write through a node and behind an outside write: the time
	// from the return of the oldest write the read missed to the read's
	// start.
	MaxLagAPI, MaxLagSQL time.Duration
	// Acked, Failed and Unknown count writes by outcome; Fenced counts the
	// failed ones that the fence rejected.
	Acked, Failed, Unknown, Fenced int
}

// deletedForGood is the rank of a delete through the API. A state's rank is
// its place in its key's order of versions, which grow with every write as
// long as the key is not deleted. The suites never write a key through the
// API once it was deleted through the API (the webapp would restart its
// version at 1), so such a delete is the last write of its key and ranks
// above everything. An outside delete carries a version of its own (the
// suite inserts the key again above it), so that a key deleted and inserted
// by outside writes keeps growing.
const deletedForGood = math.MaxInt64

// Check checks G1 and G2 (with bounds b), and that a version of a key never
// names two different values nor is returned by two acknowledged writes (a
// lost update), over ops.
//
// The rank of a read that found the item is its version. The rank of a 404
// read is the rank of the newest delete of its key that had started before
// the read ended (an API delete ranks above everything), or 0 if none had:
// the read is credited with the most favourable delete it could have seen.
// A write's obligations: every read on its node that starts after it
// returned (G1), and every read on any node that starts more than the
// bound after it returned (G2), must rank at least as high.
func Check(ops []Op, b Bounds) CheckResult {
	var res CheckResult
	byKey := map[string][]Op{}
	var keys []string
	for _, o := range ops {
		if _, ok := byKey[o.Key]; !ok {
			keys = append(keys, o.Key)
		}
		byKey[o.Key] = append(byKey[o.Key], o)
		if o.Kind.isWrite() {
			switch {
			case o.Outcome == OK:
				res.Acked++
			case o.Outcome == Unknown:
				res.Unknown++
			case o.fenced():
				res.Fenced++
				res.Failed++
			default:
				res.Failed++
			}
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		checkKey(k, byKey[k], b, &res)
	}
	return res
}

// writeIndex answers "the highest rank among writes that returned before
// t", over writes sorted by End.
type writeIndex struct {
	ends []time.Duration
	best []int // best[i]: index in ops of the highest rank among ops[0..i]
	ops  []Op
	rank []int64
}

func newWriteIndex(ws []Op, rank func(Op) int64) *writeIndex {
	ws = slices.Clone(ws)
	sort.SliceStable(ws, func(i, j int) bool { return ws[i].End < ws[j].End })
	x := &writeIndex{ops: ws}
	for i, w := range ws {
		x.ends = append(x.ends, w.End)
		x.rank = append(x.rank, rank(w))
		if i == 0 || x.rank[i] > x.rank[x.best[i-1]] {
			x.best = append(x.best, i)
		} else {
			x.best = append(x.best, x.best[i-1])
		}
	}
	return x
}

// before returns the highest-ranked write that returned strictly before t.
func (x *writeIndex) before(t time.Duration) (Op, int64, bool) {
	n := sort.Search(len(x.ends), func(i int) bool { return x.ends[i] >= t })
	if n == 0 {
		return Op{}, 0, false
	}
	i := x.best[n-1]
	return x.ops[i], x.rank[i], true
}

// firstAbove returns the earliest-returning write of rank above r that
// returned before t.
func (x *writeIndex) firstAbove(r int64, t time.Duration) (Op, bool) {
	n := sort.Search(len(x.ends), func(i int) bool { return x.ends[i] >= t })
	i := sort.Search(n, func(i int) bool { return x.rank[x.best[i]] > r })
	if i == n {
		return Op{}, false
	}
	return x.ops[x.best[i]], true
}

func checkKey(key string, ops []Op, b Bounds, res *CheckResult) {
	writeRank := func(w Op) int64 {
		switch {
		case w.Kind == KindDelete:
			return deletedForGood
		default: // a put or add, or an outside write (its delete carries its own version)
			return w.Version
		}
	}
	var deletes []Op // every delete that may have happened
	var api, sqlw, all []Op
	perNode := map[string][]Op{}
	for _, o := range ops {
		if !o.Kind.isWrite() {
			continue
		}
		if (o.Kind == KindDelete || o.Kind == KindSQLDelete) && o.Outcome != Failed {
			deletes = append(deletes, o)
		}
		if o.Outcome != OK {
			continue
		}
		all = append(all, o)
		if o.Node == SQLNode {
			sqlw = append(sqlw, o)
		} else {
			api = append(api, o)
			perNode[o.Node] = append(perNode[o.Node], o)
		}
	}
	readRank := func(r Op) int64 {
		if r.Found {
			return r.Version
		}
		rank := int64(0)
		for _, d := range deletes {
			if d.Start < r.End {
				rank = max(rank, writeRank(d))
			}
		}
		return rank
	}
	apiX, sqlX, allX := newWriteIndex(api, writeRank), newWriteIndex(sqlw, writeRank), newWriteIndex(all, writeRank)
	nodeX := map[string]*writeIndex{}
	for n, ws := range perNode {
		nodeX[n] = newWriteIndex(ws, writeRank)
	}

	const maxPerRule = 3 // per key; the first ones tell the story
	counts := map[string]int{}
	report := func(v Violation) {
		counts[v.Rule]++
		if counts[v.Rule] <= maxPerRule {
			res.Violations = append(res.Violations, v)
		} else if counts[v.Rule] == maxPerRule+1 {
			res.Violations = append(res.Violations, Violation{Rule: v.Rule, Key: key, At: v.At,
				Msg: "more violations of this rule on this key; the first ones are shown above"})
		}
	}
	describe := func(r Op) string {
		if r.Found {
			return fmt.Sprintf("v%d %q", r.Version, r.Value)
		}
		return "404"
	}

	for _, r := range ops {
		if r.Kind != KindGet || r.Outcome != OK {
			continue
		}
		res.Reads++
		rr := readRank(r)
		if w, ok := allX.firstAbove(rr, r.Start); ok {
			res.Stale++
			lag := r.Start - w.End
			if w.Node == SQLNode {
				res.MaxLagSQL = max(res.MaxLagSQL, lag)
			} else {
				res.MaxLagAPI = max(res.MaxLagAPI, lag)
			}
		}
		if x := nodeX[r.Node]; x != nil {
			if w, wr, ok := x.before(r.Start); ok && rr < wr {
				report(Violation{Rule: "G1", Key: key, At: r.Start, Ops: []int{w.ID, r.ID},
					Msg: fmt.Sprintf("read #%d on %s saw %s, but write #%d (%s) had returned on that node %v before the read started",
						r.ID, r.Node, describe(r), w.ID, writeDesc(w), r.Start-w.End)})
				continue
			}
		}
		for _, c := range []struct {
			x     *writeIndex
			bound time.Duration
		}{{apiX, b.API}, {sqlX, b.SQL}} {
			if w, wr, ok := c.x.before(r.Start - c.bound); ok && rr < wr {
				report(Violation{Rule: "G2", Key: key, At: r.Start, Ops: []int{w.ID, r.ID},
					Msg: fmt.Sprintf("read #%d on %s saw %s, but write #%d (%s) had returned %v before the read started (bound %v)",
						r.ID, r.Node, describe(r), w.ID, writeDesc(w), r.Start-w.End, c.bound)})
				break
			}
		}
	}

	// A version names one state: two values at one version, or two
	// acknowledged writes returning one version, mean two writes were not
	// serialised (a lost update) or a version went backwards.
	seen := map[int64]Op{}
	writer := map[int64]Op{}
	for _, o := range ops {
		if o.Outcome != OK || !o.Found {
			continue
		}
		if p, ok := seen[o.Version]; ok && p.Value != o.Value {
			report(Violation{Rule: "versions", Key: key, At: o.Start, Ops: []int{p.ID, o.ID},
				Msg: fmt.Sprintf("version %d has two values: %q (#%d) and %q (#%d)", o.Version, p.Value, p.ID, o.Value, o.ID)})
		} else if !ok {
			seen[o.Version] = o
		}
		if o.Kind.isWrite() {
			if p, ok := writer[o.Version]; ok {
				report(Violation{Rule: "versions", Key: key, At: o.Start, Ops: []int{p.ID, o.ID},
					Msg: fmt.Sprintf("writes #%d and #%d were both acknowledged with version %d: one update was lost", p.ID, o.ID, o.Version)})
			} else {
				writer[o.Version] = o
			}
		}
	}
}

func writeDesc(w Op) string {
	switch w.Kind {
	case KindDelete:
		return "delete on " + w.Node
	case KindSQLDelete:
		return fmt.Sprintf("outside delete, as v%d", w.Version)
	case KindSQLUpsert:
		return fmt.Sprintf("outside write of v%d %q", w.Version, w.Value)
	default:
		return fmt.Sprintf("%s on %s → v%d %q", w.Kind, w.Node, w.Version, w.Value)
	}
}

// Row is a key's state in Postgres, or what a node returned for it.
type Row struct {
	Found   bool
	Value   string
	Version int64
}

func (r Row) String() string {
	if !r.Found {
		return "404"
	}
	return fmt.Sprintf("v%d %q", r.Version, r.Value)
}

// CheckAdds checks G6 for keys written only by adds of positive deltas:
// the final value (from final, Postgres after quiescence) is at least the
// sum of the acknowledged deltas and at most that plus the deltas of adds
// whose outcome is unknown; the final version, which counts the adds
// applied, lies in the same way between the two counts.
func CheckAdds(ops []Op, keys []string, final map[string]Row) []Violation {
	var vs []Violation
	for _, k := range keys {
		var acked, unknown, nAcked, nUnknown int64
		var last time.Duration
		var ids []int
		for _, o := range ops {
			if o.Key != k || o.Kind != KindAdd {
				continue
			}
			last = max(last, o.End)
			d, err := strconv.ParseInt(o.Arg, 10, 64)
			if err != nil || d <= 0 {
				vs = append(vs, Violation{Rule: "G6", Key: k, At: o.Start, Ops: []int{o.ID}, Msg: fmt.Sprintf("add #%d has delta %q: CheckAdds needs positive deltas", o.ID, o.Arg)})
				continue
			}
			switch o.Outcome {
			case OK:
				acked += d
				nAcked++
			case Unknown:
				unknown += d
				nUnknown++
				ids = append(ids, o.ID)
			}
		}
		row := final[k]
		var value int64
		if row.Found {
			var err error
			if value, err = strconv.ParseInt(row.Value, 10, 64); err != nil {
				vs = append(vs, Violation{Rule: "G6", Key: k, At: last, Msg: fmt.Sprintf("final value %q is not an integer", row.Value)})
				continue
			}
		}
		if value < acked || value > acked+unknown {
			vs = append(vs, Violation{Rule: "G6", Key: k, At: last, Ops: ids,
				Msg: fmt.Sprintf("final value %d not in [%d, %d]: acknowledged adds sum to %d (%d adds), adds of unknown outcome to %d (%d adds)",
					value, acked, acked+unknown, acked, nAcked, unknown, nUnknown)})
		}
		if row.Version < nAcked || row.Version > nAcked+nUnknown {
			vs = append(vs, Violation{Rule: "G6", Key: k, At: last, Ops: ids,
				Msg: fmt.Sprintf("final version %d not in [%d, %d]: %d adds acknowledged, %d of unknown outcome", row.Version, nAcked, nAcked+nUnknown, nAcked, nUnknown)})
		}
	}
	return vs
}
