-- One wrk script for every target: method from $METHOD (POST unless set), body from $BODY, the
-- path from wrk's URL argument, and a machine-readable line with throughput and latency
-- percentiles (ms) at the end. For example:
--   METHOD=GET wrk -t2 -c64 -d10s -s bench/wrk.lua http://127.0.0.1:7070/v1/cluster
--   BODY='{"add":1}' wrk -t2 -c256 -d10s -s bench/wrk.lua http://127.0.0.1:7070/v1/machines/counter/tasks
wrk.method = os.getenv("METHOD") or "POST"
wrk.body = os.getenv("BODY") or ""
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  -- mean and max too: a p99 far above the rest is then either many slow requests or a few
  -- very slow ones (one stall), which the percentiles alone do not tell.
  io.write(string.format("RESULT requests=%d seconds=%.3f p50=%.3f p90=%.3f p99=%.3f p999=%.3f mean=%.3f max=%.3f errors=%d\n",
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    latency.mean / 1000, latency.max / 1000, errors))
end
