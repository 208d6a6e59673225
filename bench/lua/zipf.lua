-- warm: each request carries one of BENCH_TOKEN_COUNT tokens (BENCH_TOKEN_PREFIX .. k, k from 0),
-- drawn from a Zipf distribution with exponent BENCH_ZIPF_S (rank 1 = most popular).
-- The CDF and the formatted requests are computed once per thread in init().
local cdf, reqs, n

function init(args)
  local prefix = os.getenv("BENCH_TOKEN_PREFIX")
  n = tonumber(os.getenv("BENCH_TOKEN_COUNT"))
  local s = tonumber(os.getenv("BENCH_ZIPF_S") or "1.0")
  local path = os.getenv("BENCH_PATH") or "/"
  cdf, reqs = {}, {}
  local total = 0
  for k = 1, n do
    total = total + 1 / (k ^ s)
    cdf[k] = total
  end
  for k = 1, n do
    cdf[k] = cdf[k] / total
    reqs[k] = wrk.format("GET", path, { ["Authorization"] = "Bearer " .. prefix .. (k - 1) })
  end
  cdf[n] = 1.0
  math.randomseed(os.time() * 7919 + tid * 104729)
end

function request()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  sent = sent + 1
  return reqs[lo]
end
