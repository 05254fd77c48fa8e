<?php
// Checks of the PHP client's fill protocol on a real Redis and memcached. Run by
// tests/tests/fill_protocol.rs, which passes a tombstone the consumer wrote, so a purge here
// is written in exactly the consumer's form.
//
// Usage: php protocol_test.php <redis host:port> <memcached host:port> <key prefix> <tombstone>

declare(strict_types=1);

require __DIR__ . '/../src/Rtinval.php';

use Rtinval\NodeCache;
use Rtinval\Protocol;

[, $redisAddr, $mcAddr, $prefix, $sample] = $argv + [null, null, null, null, null];
if ($sample === null) {
    fwrite(STDERR, "usage: php protocol_test.php <redis host:port> <memcached host:port> <prefix> <tombstone>\n");
    exit(2);
}

$checks = 0;
function check(bool $ok, string $what): void
{
    global $checks;
    if (!$ok) {
        fwrite(STDERR, "FAILED: $what\n");
        exit(1);
    }
    $checks++;
}

// The consumer's tombstone parses as one, with its position.
$s = Protocol::parse($sample);
check($s->kind === 'tombstone' && $s->basis === '0-1-1', 'the consumer\'s tombstone parses');
check(Protocol::parse(Protocol::data('0-1-2', "a\nb"))->payload === "a\nb", 'data round trip');
check(Protocol::parse('plain')->kind === 'foreign', 'foreign values');
check(Rtinval\key('object:{id}', ['id' => 42]) === 'object:42', 'key');
check(Rtinval\key('ipv4:{ip|ipv4}', ['ip' => 167772161]) === 'ipv4:10.0.0.1', 'ipv4 key');
check(Rtinval\key('ipv6:{ip|ipv6}', ['ip' => inet_pton('2001:db8::1')]) === 'ipv6:2001:db8::1', 'ipv6 key');

/** A purge as the consumer writes it: the tombstone with a fresh nonce. */
$tombstone = fn (string $position): string => Rtinval\TAG . 'T ' . $position . ' ' . Protocol::nonce();

[$rh, $rp] = explode(':', $redisAddr);
$redis = new Redis();
$redis->connect($rh, (int) $rp);
[$mh, $mp] = explode(':', $mcAddr);
$mc = new Memcached();
$mc->addServer($mh, (int) $mp);

$kinds = [
    'redis' => [NodeCache::redis($redis, $prefix . 'r:'), fn (string $k, string $v) => $redis->set($prefix . 'r:' . $k, $v)],
    'memcached' => [NodeCache::memcached($mc, $prefix . 'm:'), fn (string $k, string $v) => $mc->set($prefix . 'm:' . $k, $v, 300)],
];
foreach ($kinds as $kind => [$cache, $purge]) {
    // Read, purge, fill: refused.
    $r = $cache->get('object:1');
    check(!$r->hit, "$kind: first read misses");
    $purge('object:1', $tombstone('0-1-5'));
    check(!$cache->fill($r->token, 'old', 300000), "$kind: a fill after a purge is refused");
    // Read after the purge: fills, and the data keeps the purge's position.
    $r = $cache->get('object:1');
    check(!$r->hit && $r->token->basis === '0-1-5', "$kind: a tombstone is a miss with its position");
    check($cache->fill($r->token, 'new', 300000), "$kind: a fill after the purge is stored");
    $r = $cache->get('object:1');
    check($r->hit && $r->value === 'new', "$kind: the fill is read back");
    // Two readers miss together: only the first fill is stored.
    $a = $cache->get('object:2');
    $b = $cache->get('object:2');
    check($cache->fill($a->token, 'a', 300000), "$kind: first of two fills");
    check(!$cache->fill($b->token, 'b', 300000), "$kind: second of two fills refused");
    // Read through.
    $loads = 0;
    $v = $cache->readThrough('object:3', 300000, function () use (&$loads) {
        $loads++;
        return 'loaded';
    });
    $v2 = $cache->readThrough('object:3', 300000, function () use (&$loads) {
        $loads++;
        return 'again';
    });
    check($v === 'loaded' && $v2 === 'loaded' && $loads === 1, "$kind: read through loads once");
}

// Redis without the scripts (a restarted server): the client loads them again.
$redis->script('flush');
$r = $kinds['redis'][0]->get('object:9');
check(!$r->hit && $kinds['redis'][0]->fill($r->token, 'v', 300000), 'redis: works after SCRIPT FLUSH');

echo "$checks checks passed\n";
