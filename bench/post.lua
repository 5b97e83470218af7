-- wrk script: POST {"key":"bench"} with the bearer token from $TOKEN (empty for the references).
wrk.method = "POST"
wrk.body = '{"key":"bench"}'
wrk.headers["Content-Type"] = "application/json"
local token = os.getenv("TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
