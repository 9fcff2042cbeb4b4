-- POST /auth/refresh, each refresh token used once, as a client does: every response's
-- new refresh token goes to the back of this thread's queue and each request takes the
-- one at the front. bench.py gives each thread one token (session) per connection and
-- one more, for the request wrk builds when the thread starts and never sends; so no
-- connection waits without a token, and no token is ever presented twice.
local queue = {}
local first, last = 1, 0
local next_thread = 0

setup = function(thread)
  next_thread = next_thread + 1
  thread:set("tokens", BENCH_TOKENS[next_thread])
end

init = function(args)
  for token in string.gmatch(wrk.thread:get("tokens"), "[^,]+") do
    last = last + 1
    queue[last] = token
  end
end

request = function()
  local token = queue[first]
  if first <= last then
    queue[first] = nil
    first = first + 1
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                    '{"refresh_token": "' .. (token or "none-left") .. '"}')
end

response = function(status, headers, body)
  local token = string.match(body, '"refresh_token":%s*"([^"]+)"')
  if token then
    last = last + 1
    queue[last] = token
  end
end
