-- POST /auth/register with a new username and email every time: a prefix (bench.py), the
-- wrk run (BENCH_RUN: the warm-up and the measured run differ), the wrk thread and a
-- counter. The password contains neither, as the policy requires.
local counter = 0
local thread_id = 0
local next_thread = 0

setup = function(thread)
  next_thread = next_thread + 1
  thread:set("thread_id", next_thread)
end

init = function(args)
  thread_id = tonumber(wrk.thread:get("thread_id")) or 0
end

request = function()
  counter = counter + 1
  local name = string.format("%s%st%dn%d", BENCH_PREFIX, BENCH_RUN, thread_id, counter)
  local body = string.format('{"email": "%s@example.com", "username": "%s", "password": "%s"}',
                             name, name, BENCH_PASSWORD)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
