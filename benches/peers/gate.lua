-- The nginx + Lua + Redis peer's work per request (access phase):
--   1. "Authorization: Bearer <jwt>", three base64url parts;
--   2. header alg must be HS256, HMAC-SHA256 of "<header>.<payload>" must match the signature,
--      claim exp must be in the future and claim sub a non-empty string; else 401;
--   3. one EVALSHA in Redis checks and increments the counter of customer sub (429 at the
--      limit, 503 if Redis fails), over a pooled cosocket connection;
--   4. nginx then proxies to the upstream.
--
-- Debian has no lua-resty-string/-hmac/-openssl and ngx.hmac_sha1 is SHA-1 only, so the HMAC
-- is OpenSSL's one-shot HMAC() through the LuaJIT FFI (libcrypto is already linked into
-- nginx), as lua-resty-openssl does for Kong.

local ffi = require("ffi")
local cjson = require("cjson.safe")
local redis = require("nginx.redis") -- Debian's lua-nginx-redis: lua-resty-redis
local b64 = require("ngx.base64")

local ngx = ngx
local sub, find, byte, fmt = string.sub, string.find, string.byte, string.format
local decode64, encode64 = b64.decode_base64url, b64.encode_base64url
local decode_json = cjson.decode

-- Check-and-increment: the count after this request, or -1 at the limit (a denied request
-- takes nothing).
local SCRIPT = [[
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return -1 end
return redis.call('INCR', KEYS[1])
]]

local M = {}
local secret, limit, redis_port, script_sha
local crypto, md, mac_buf, mac_len

local function hmac_sha256(data)
    if crypto.HMAC(md, secret, #secret, data, #data, mac_buf, mac_len) == nil then
        return nil
    end
    return ffi.string(mac_buf, mac_len[0])
end

function M.init()
    secret = assert(os.getenv("PEERS_JWT_SECRET"), "PEERS_JWT_SECRET is not set")
    limit = os.getenv("PEERS_LIMIT") or "1000000000000"
    redis_port = tonumber(os.getenv("PEERS_REDIS_PORT") or "6379")

    ffi.cdef([[
        typedef struct evp_md_st EVP_MD;
        const EVP_MD *EVP_sha256(void);
        unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                            const unsigned char *d, size_t n, unsigned char *md,
                            unsigned int *md_len);
    ]])
    if pcall(function() return ffi.C.HMAC end) then
        crypto = ffi.C
    else
        crypto = ffi.load("libcrypto.so.3")
    end
    md = crypto.EVP_sha256()
    mac_buf = ffi.new("unsigned char[64]")
    mac_len = ffi.new("unsigned int[1]")

    -- RFC 4231 test case 2, so a broken binding fails at start and not as 401s.
    local saved = secret
    secret = "Jefe"
    local ok = encode64(hmac_sha256("what do ya want for nothing?"))
        == "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM"
    secret = saved
    assert(ok, "HMAC-SHA256 self-test failed")

    local digest = ngx.sha1_bin(SCRIPT)
    script_sha = digest:gsub(".", function(c) return fmt("%02x", byte(c)) end)
end

-- The customer of a valid token, or nil.
local function customer_of(auth)
    if not auth or sub(auth, 1, 7) ~= "Bearer " then
        return nil
    end
    local d1 = find(auth, ".", 8, true)
    local d2 = d1 and find(auth, ".", d1 + 1, true)
    if not d2 or find(auth, ".", d2 + 1, true) then
        return nil
    end
    local header = decode_json(decode64(sub(auth, 8, d1 - 1)) or "")
    if type(header) ~= "table" or header.alg ~= "HS256" then
        return nil
    end
    local mac = hmac_sha256(sub(auth, 8, d2 - 1))
    if not mac or encode64(mac) ~= sub(auth, d2 + 1) then
        return nil
    end
    local claims = decode_json(decode64(sub(auth, d1 + 1, d2 - 1)) or "")
    if type(claims) ~= "table" then
        return nil
    end
    if type(claims.exp) ~= "number" or claims.exp <= ngx.time() then
        return nil
    end
    if type(claims.sub) ~= "string" or claims.sub == "" then
        return nil
    end
    return claims.sub
end

-- The count after this request, -1 at the limit, or nil and an error.
local function take(customer)
    local red = redis:new()
    red:set_timeouts(1000, 1000, 1000)
    local ok, err = red:connect("127.0.0.1", redis_port)
    if not ok then
        return nil, err
    end
    local key = "q:" .. customer
    local n
    n, err = red:evalsha(script_sha, 1, key, limit)
    if not n and err and find(err, "NOSCRIPT", 1, true) then
        -- First call on a fresh Redis: EVAL caches the script for the EVALSHAs after it.
        n, err = red:eval(SCRIPT, 1, key, limit)
    end
    if not n then
        red:close()
        return nil, err
    end
    red:set_keepalive(60000, 256)
    return n
end

function M.access()
    local customer = customer_of(ngx.var.http_authorization)
    if not customer then
        return ngx.exit(401)
    end
    local n, err = take(customer)
    if not n then
        ngx.log(ngx.ERR, "quota store: ", err)
        return ngx.exit(503)
    end
    if n == -1 then
        return ngx.exit(429)
    end
end

return M
