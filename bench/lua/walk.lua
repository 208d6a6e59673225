-- cold: every request carries the next token of BENCH_TOKEN_PREFIX .. i, so no token repeats.
-- Thread t walks [t*stride, (t+1)*stride) with stride = BENCH_TOKEN_COUNT / threads; the
-- orchestrator checks from `sent_by_thread` that no thread ran past its slice.
-- BENCH_WRAP=1 wraps around inside the slice instead (cache warm-up, tokens do repeat).
local prefix, path, first, stride, wrap

function init(args)
  prefix = os.getenv("BENCH_TOKEN_PREFIX")
  path = os.getenv("BENCH_PATH") or "/"
  stride = math.floor(tonumber(os.getenv("BENCH_TOKEN_COUNT")) / nthreads)
  first = tid * stride
  wrap = os.getenv("BENCH_WRAP") == "1"
end

function request()
  local i = sent
  if wrap then i = i % stride end
  sent = sent + 1
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. prefix .. (first + i) })
end
