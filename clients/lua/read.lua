-- rtinval fill protocol: read one key (see clients/README.md).
-- KEYS[1]: the key. KEYS[2]: the cache's applied-position key (written by the consumer).
-- ARGV[1]: a nonce unique to this read. ARGV[2]: the lease's time to live in ms.
-- Returns what the key holds. A key that holds nothing gets a lease, which is returned: the
-- reader's fill succeeds only if that lease is still there (no purge came in between).
local v = redis.call('GET', KEYS[1])
if v then
  return v
end
local basis = redis.call('GET', KEYS[2]) or '-'
local lease = 'rtv1 L ' .. basis .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], lease, 'PX', ARGV[2])
return lease
