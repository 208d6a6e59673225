-- hot / bodies / emulator: one fixed request, built once by wrk (no per-request Lua).
-- BENCH_TOKEN: bearer token (optional); BENCH_METHOD, BENCH_BODY_BYTES, BENCH_BODY,
-- BENCH_CONTENT_TYPE: optional request body.
local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
wrk.method = os.getenv("BENCH_METHOD") or "GET"
local size = tonumber(os.getenv("BENCH_BODY_BYTES") or "0")
if size > 0 then
  wrk.body = string.rep("x", size)
elseif os.getenv("BENCH_BODY") then
  wrk.body = os.getenv("BENCH_BODY")
end
if os.getenv("BENCH_CONTENT_TYPE") then
  wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
end
