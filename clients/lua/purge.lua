-- rtinval fill protocol: the consumer's purge (see clients/README.md).
-- KEYS: the purged keys. ARGV[1]: the tombstone. ARGV[2]: its time to live in ms.
-- ARGV[3], ARGV[4]: the purge's GTID domain and sequence number ('' when the position is not a
-- MariaDB GTID).
-- Sets each key to the tombstone, unless the key already holds a marker or data from a newer
-- position of the same domain: a purge applied late (a retry, a redelivery) never replaces a
-- newer one. Skipping is safe: that newer marker was written after this purge's commit, so
-- every read it admits saw this change too.
local domain, seq = ARGV[3], tonumber(ARGV[4])
for _, key in ipairs(KEYS) do
  local newer = false
  if seq then
    local current = redis.call('GET', key)
    local position = current and string.match(current, '^rtv1 [TDL] ([^ \n]+)')
    if position then
      for d, s in string.gmatch(position, '(%d+)%-%d+%-(%d+)') do
        if d == domain and tonumber(s) > seq then
          newer = true
        end
      end
    end
  end
  if not newer then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  end
end
return #KEYS
