package main

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/store"
)

// The library has no metrics dependency: this example feeds Prometheus from
// its Stats snapshots (read at scrape time) and from its tracing hooks
// (load and write durations).

// statsCollector exports the counters of the cache, the bus and the store.
type statsCollector struct {
	cache func() cache.Stats
	bus   func() invalidate.Stats
	store func() store.Stats
	// replica is nil without -replica-url.
	replica func() store.ReplicaStats
	// audit is nil without -audit-rate.
	audit func() store.AuditStats
}

var (
	descCache   = map[string]*prometheus.Desc{}
	descBus     = map[string]*prometheus.Desc{}
	descStore   = map[string]*prometheus.Desc{}
	descReplica = map[string]*prometheus.Desc{
		"replica_reads":  prometheus.NewDesc("coherent_replica_reads_total", "Loads served by the replica.", nil, nil),
		"waits":          prometheus.NewDesc("coherent_replica_waits_total", "Loads that found the replica behind and waited for it.", nil, nil),
		"primary_reads":  prometheus.NewDesc("coherent_replica_primary_reads_total", "Loads the primary served: replica behind, failing, or the position unknown.", nil, nil),
		"replica_errors": prometheus.NewDesc("coherent_replica_errors_total", "Failed reads of the replica.", nil, nil),
	}
	descAudit = map[string]*prometheus.Desc{
		"checked":         prometheus.NewDesc("coherent_audit_checked_total", "Cached items the auditor compared with the primary.", nil, nil),
		"rechecks":        prometheus.NewDesc("coherent_audit_rechecks_total", "Items that differed from the primary and were read again after the staleness bound.", nil, nil),
		"resolved":        prometheus.NewDesc("coherent_audit_resolved_total", "Re-checks that found the difference gone (a write in flight).", nil, nil),
		"inconsistencies": prometheus.NewDesc("coherent_audit_inconsistencies_total", "Cached items still different from the primary after the staleness bound; each was invalidated.", nil, nil),
		"source_errors":   prometheus.NewDesc("coherent_audit_source_errors_total", "Failed reads of the primary by the auditor.", nil, nil),
		"skipped":         prometheus.NewDesc("coherent_audit_skipped_total", "Samples and re-checks dropped while the cache was not serving from memory.", nil, nil),
	}
	descAuditConsistency = prometheus.NewDesc("coherent_audit_consistency_ratio", "Share of the checked items that were consistent with the primary (1 before any check).", nil, nil)
	descAuditNines       = prometheus.NewDesc("coherent_audit_nines", "The consistency ratio as nines, -log10(1 - ratio); log10(checked) while no inconsistency was found.", nil, nil)
	descFlush            = prometheus.NewDesc("coherent_bus_flushes_total", "Flushes of every local subscription, by cause.", []string{"cause"}, nil)
	descSize             = prometheus.NewDesc("coherent_cache_entries", "Entries held by the cache.", nil, nil)
	descWeight           = prometheus.NewDesc("coherent_cache_weight_bytes", "Weight of the entries held by the cache (Options.Weigher).", nil, nil)
	descListen           = prometheus.NewDesc("coherent_store_relay_listening", "1 while notifications wake the relay, 0 while it polls (a pooler in transaction mode without -listen-url?).", nil, nil)
)

func init() {
	for name, help := range map[string]string{
		"hits": "Lookups served from the cache.", "misses": "Lookups that found no live entry.",
		"bypassed": "Lookups read through because the bus link was unproven.", "loads": "Loader calls.",
		"load_errors": "Failed loads.", "coalesced": "Lookups that shared another caller's load.",
		"skipped_stores":     "Loads not stored because an invalidation overlapped them.",
		"invalidations_sent": "Keys published.", "invalidations_received": "Keys received.",
		"publish_errors": "Failed publications.", "flushes": "Times every entry was dropped.",
		"evictions":        "Entries evicted for capacity or for the byte budget.",
		"weight_evictions": "Entries evicted for the byte budget (part of evictions).",
		"oversized":        "Values larger than a shard's share of the byte budget, served but not cached.",
		"values_sent":      "Values and tombstones broadcast (-broadcast).",
		"values_installed": "Values and tombstones received and installed, each saving a load.",
		"values_rejected":  "Values and tombstones received but not provably newest: dropped as plain invalidations.",
		"oversize_values":  "Written values larger than the broadcast limit, sent as plain invalidations.",
		"codec_errors":     "Values that failed to encode or decode, sent or received as plain invalidations.",
	} {
		descCache[name] = prometheus.NewDesc("coherent_cache_"+name+"_total", help, nil, nil)
	}
	for name, help := range map[string]string{
		"messages_sent": "Messages published.", "messages_received": "Messages received from other nodes.",
		"proofs": "Proofs of the link.", "proof_timeouts": "Connections declared dead for a missing proof.",
		"reconnects": "Reconnection attempts.", "publish_errors": "Failed sends.",
		"links_lost": "Detected failures of the link, each ending the caches' proof at once.",
	} {
		descBus[name] = prometheus.NewDesc("coherent_bus_"+name+"_total", help, nil, nil)
	}
	for name, help := range map[string]string{
		"publish_failures": "Committed writes whose invalidation the bus did not take.",
		"relayed":          "Outbox rows published by the relay.", "relay_errors": "Failed relay rounds.",
		"poison_rows":    "Outbox rows no cache can hold: flushed their namespace, or dropped.",
		"relay_unproven": "Relay rounds that claimed nothing because the bus link was unproven.",
	} {
		descStore[name] = prometheus.NewDesc("coherent_store_"+name+"_total", help, nil, nil)
	}
}

func (c statsCollector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c statsCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	cs := c.cache()
	for name, v := range map[string]uint64{
		"hits": cs.Hits, "misses": cs.Misses, "bypassed": cs.Bypassed, "loads": cs.Loads,
		"load_errors": cs.LoadErrors, "coalesced": cs.Coalesced, "skipped_stores": cs.SkippedStores,
		"invalidations_sent": cs.InvalidationsSent, "invalidations_received": cs.InvalidationsReceived,
		"publish_errors": cs.PublishErrors, "flushes": cs.Flushes, "evictions": cs.Evictions,
		"weight_evictions": cs.WeightEvictions, "oversized": cs.Oversized,
		"values_sent": cs.ValuesSent, "values_installed": cs.ValuesInstalled, "values_rejected": cs.ValuesRejected,
		"oversize_values": cs.OversizeValues, "codec_errors": cs.CodecErrors,
	} {
		counter(descCache[name], v)
	}
	ch <- prometheus.MustNewConstMetric(descSize, prometheus.GaugeValue, float64(cs.Entries))
	ch <- prometheus.MustNewConstMetric(descWeight, prometheus.GaugeValue, float64(cs.Weight))
	bs := c.bus()
	for name, v := range map[string]uint64{
		"messages_sent": bs.MessagesSent, "messages_received": bs.MessagesReceived, "proofs": bs.Proofs,
		"proof_timeouts": bs.ProofTimeouts, "reconnects": bs.Reconnects, "publish_errors": bs.PublishErrors,
		"links_lost": bs.LinksLost,
	} {
		counter(descBus[name], v)
	}
	for cause, v := range map[string]uint64{
		"resubscribe": bs.FlushesResubscribe, "gap": bs.FlushesGap, "malformed": bs.FlushesMalformed,
		"proof_timeout": bs.FlushesProofTimeout, "trimmed": bs.FlushesTrimmed, "requested": bs.FlushesRequested,
		"first_subscription": bs.FlushesFirstSubscription,
	} {
		counter(descFlush, v, cause)
	}
	ss := c.store()
	for name, v := range map[string]uint64{
		"publish_failures": ss.PublishFailures, "relayed": ss.Relayed, "relay_errors": ss.RelayErrors,
		"poison_rows": ss.PoisonRows, "relay_unproven": ss.RelayUnproven,
	} {
		counter(descStore[name], v)
	}
	listening := 0.0
	if ss.RelayListening {
		listening = 1
	}
	ch <- prometheus.MustNewConstMetric(descListen, prometheus.GaugeValue, listening)
	if c.replica != nil {
		rs := c.replica()
		for name, v := range map[string]uint64{
			"replica_reads": rs.ReplicaReads, "waits": rs.Waits, "primary_reads": rs.PrimaryReads, "replica_errors": rs.ReplicaErrors,
		} {
			counter(descReplica[name], v)
		}
	}
	if c.audit != nil {
		as := c.audit()
		for name, v := range map[string]uint64{
			"checked": as.Checked, "rechecks": as.Rechecks, "resolved": as.Resolved,
			"inconsistencies": as.Inconsistencies, "source_errors": as.SourceErrors, "skipped": as.Skipped,
		} {
			counter(descAudit[name], v)
		}
		ch <- prometheus.MustNewConstMetric(descAuditConsistency, prometheus.GaugeValue, as.Consistency())
		ch <- prometheus.MustNewConstMetric(descAuditNines, prometheus.GaugeValue, as.Nines())
	}
}

// tracer times loads (cache.LoadTracer) and writes (store.WriteTracer).
type tracer struct {
	loads, writes *prometheus.HistogramVec
}

func newTracer(reg prometheus.Registerer) *tracer {
	t := &tracer{
		loads: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "coherent_cache_load_duration_seconds", Help: "Duration of loads from Postgres.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 14),
		}, []string{"outcome"}),
		writes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "coherent_store_write_duration_seconds", Help: "Duration of writes through the store.",
			Buckets: prometheus.ExponentialBuckets(100e-6, 2, 14),
		}, []string{"outcome"}),
	}
	reg.MustRegister(t.loads, t.writes)
	return t
}

type startKey struct{}

func (t *tracer) TraceLoadStart(ctx context.Context, _ cache.TraceLoadStartData) context.Context {
	return context.WithValue(ctx, startKey{}, time.Now())
}

func (t *tracer) TraceLoadEnd(ctx context.Context, d cache.TraceLoadEndData) {
	outcome := "ok"
	switch {
	case errors.Is(d.Err, cache.ErrNotFound):
		outcome = "not_found"
	case d.Err != nil:
		outcome = "error"
	}
	if start, ok := ctx.Value(startKey{}).(time.Time); ok {
		t.loads.WithLabelValues(outcome).Observe(time.Since(start).Seconds())
	}
}

func (t *tracer) TraceWriteStart(ctx context.Context, _ store.TraceWriteStartData) context.Context {
	return context.WithValue(ctx, startKey{}, time.Now())
}

func (t *tracer) TraceWriteEnd(ctx context.Context, d store.TraceWriteEndData) {
	outcome := "published"
	switch {
	case !d.Committed:
		outcome = "failed"
	case !d.Published:
		outcome = "relayed"
	}
	if start, ok := ctx.Value(startKey{}).(time.Time); ok {
		t.writes.WithLabelValues(outcome).Observe(time.Since(start).Seconds())
	}
}
