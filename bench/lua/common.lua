-- Shared by every benchmark script (prepended by bench/wrk.py).
-- setup() numbers the threads; done() prints one machine-readable line:
--   BENCH_JSON {...}   latency in microseconds, plus per-thread request counters.
-- Scenario scripts configure themselves from environment variables (BENCH_*), not wrk args.

local threads = {}
sent = 0

function setup(thread)
  thread:set("tid", #threads)
  thread:set("nthreads", tonumber(os.getenv("BENCH_THREADS") or "1"))
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local sent_by_thread = {}
  for i, t in ipairs(threads) do
    sent_by_thread[i] = string.format("%d", t:get("sent") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d},"sent_by_thread":[%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9),
    table.concat(sent_by_thread, ",")))
end
