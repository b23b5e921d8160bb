-- wrk script of the peer bench: request i carries token i of the file named after "--"
-- (round robin over the customers), and done() prints one machine-readable line
-- (latencies in microseconds).
local reqs, n, i = {}, 0, 0

function init(args)
    local path = args[2] or "/"
    for line in io.lines(args[1]) do
        if #line > 0 then
            n = n + 1
            reqs[n] = wrk.format("GET", path, { ["Authorization"] = "Bearer " .. line })
        end
    end
end

function request()
    i = i % n + 1
    return reqs[i]
end

function done(s, latency, _)
    local e = s.errors
    io.write(string.format(
        "PEERS requests=%d duration_us=%d non2xx=%d socket=%d p50_us=%d p99_us=%d p999_us=%d\n",
        s.requests, s.duration, e.status, e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
