"""Prometheus metrics for the mount daemon (``snapfs mount --metrics-port N``).

The counters live in the daemon's ObjectSource; a custom collector reads them at
scrape time (from prometheus-client's HTTP thread: plain int reads, no locks
needed), so the read path pays nothing for metrics except one histogram
observation per store fetch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

_COUNTERS = {
    "hits": ("snapfs_cache_hits", "Objects served from memory or the disk cache"),
    "misses": ("snapfs_cache_misses", "Objects fetched from the store"),
    "fetched_bytes": ("snapfs_fetched_bytes", "Bytes fetched from the store (verified)"),
    "verify_failures": ("snapfs_verify_failures", "Objects whose bytes did not match their ID"),
    "fetch_errors": ("snapfs_fetch_errors", "Fetches that failed: missing object or store unavailable"),
    "fast_failures": (
        "snapfs_fast_failures",
        "Misses failed at once because the store was known to be unavailable",
    ),
    "cache_write_failures": (
        "snapfs_cache_write_failures",
        "Verified objects that could not be written to the cache",
    ),
    "backlog_waits": (
        "snapfs_backlog_waits",
        "Misses that waited for the cache disk: the write backlog was full",
    ),
    "pack_fetches": ("snapfs_pack_fetches", "Whole packs of small objects fetched for a miss"),
    "pack_siblings": (
        "snapfs_pack_siblings",
        "Objects cached because they came in a pack fetched for another object's miss",
    ),
    "cache_sync_failures": (
        "snapfs_cache_sync_failures",
        "Periodic syncs of new cache files that failed; a reboot drops what they left unsynced",
    ),
}
_GAUGES = {
    "cache_bytes": ("snapfs_cache_bytes", "Bytes in the node cache"),
    "cache_pinned_bytes": ("snapfs_cache_pinned_bytes", "Bytes pinned in the node cache"),
    "cache_objects": ("snapfs_cache_objects", "Objects in the node cache"),
    "cache_unsynced_objects": (
        "snapfs_cache_unsynced_objects",
        "Cached objects not yet synced to disk (a reboot before the next sync drops them)",
    ),
    "cache_limit_bytes": ("snapfs_cache_limit_bytes", "The cache size limit"),
    "rss_bytes": ("snapfs_daemon_rss_bytes", "Resident memory of the daemon"),
    "snapshots_open": ("snapfs_snapshots_open", "Snapshots opened during this mount"),
    "write_backlog_bytes": (
        "snapfs_write_backlog_bytes",
        "Fetched, verified bytes held in memory until their cache write",
    ),
    "store_unavailable_seconds": (
        "snapfs_store_unavailable_seconds",
        "How long the store has been failing fetches as unavailable; 0 while it answers",
    ),
}


class _Collector:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self):
        try:
            status = self.daemon.status()
        except Exception:  # never break a scrape because the daemon is starting or stopping
            log.debug("status unavailable for metrics", exc_info=True)
            return
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=status.get(key) or 0)
        for key, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=status.get(key) or 0)


class Metrics:
    def __init__(self, daemon: Daemon, addr: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(daemon))
        self.fetch_seconds = Histogram(
            "snapfs_fetch_seconds",
            "Latency of one store fetch, including verification",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)
        log.info("serving Prometheus metrics on http://%s:%d/metrics", addr, port)

    def observe_fetch(self, seconds: float, _nbytes: int) -> None:
        self.fetch_seconds.observe(seconds)


def start_metrics(daemon: Daemon, addr: str, port: int) -> Metrics:
    return Metrics(daemon, addr, port)
