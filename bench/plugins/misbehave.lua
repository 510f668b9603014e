-- wrk: every EVERY-th request of each connection carries `x-misbehave: KIND`
-- (bench/plugins/misbehave.sh); EVERY=0 sends none.
local every = tonumber(os.getenv("EVERY") or "0")
local kind = os.getenv("KIND") or "loop"
local n = 0
local plain, bad
init = function(args)
  -- In init, not at load: wrk sets its Host header after loading the script.
  plain = wrk.format("GET", "/obj")
  bad = wrk.format("GET", "/obj", {["x-misbehave"] = kind})
end
request = function()
  n = n + 1
  if every > 0 and n % every == 0 then return bad end
  return plain
end
