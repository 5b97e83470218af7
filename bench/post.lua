-- wrk script: POST $BODY (default {"key":"bench"}) with the bearer token from $TOKEN (empty for the
-- references), or, with $TOKENS_FILE, a different token of that file on every request so
-- that each one is verified (signature and claims) rather than served from the cache.
wrk.method = "POST"
wrk.body = os.getenv("BODY") or ""
if wrk.body == "" then wrk.body = '{"key":"bench"}' end
wrk.headers["Content-Type"] = "application/json"
local token = os.getenv("TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

local tokens = {}
local file = os.getenv("TOKENS_FILE")
if file and file ~= "" then
  for line in io.lines(file) do
    tokens[#tokens + 1] = line
  end
end
local next_token = 0

if #tokens > 0 then
  request = function()
    next_token = next_token % #tokens + 1
    wrk.headers["Authorization"] = "Bearer " .. tokens[next_token]
    return wrk.format()
  end
end
