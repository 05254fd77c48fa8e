-- rtinval fill protocol: fill one key (see clients/README.md).
-- KEYS[1]: the key. ARGV[1]: the marker (lease or tombstone) the read returned.
-- ARGV[2]: the value to store. ARGV[3]: its time to live in ms (0: none).
-- Stores the value only if the key still holds exactly that marker: any purge since the read
-- replaced it with a new tombstone, so data read before that purge is never stored.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
