<?php
// rtinval's PHP client: read through the node-local cache, fill it without ever storing data
// older than the last purge (the fill protocol, clients/README.md), and after a write wait
// until this node has invalidated it. Needs php-redis and/or php-memcached; nothing else.
//
//   require '/path/to/clients/php/src/Rtinval.php';
//   $cache = Rtinval\NodeCache::redis($redis, 'rt:');          // a connected \Redis
//   $json = $cache->readThrough('object:42', 300, fn () => loadObject($db, 42));
//   // after a write and COMMIT:
//   (new Rtinval\Barrier('http://127.0.0.1:9464'))->wait(Rtinval\last_gtid($db), 2000);
//
// The stored forms are the Rust crate's (clients/rust/src/protocol.rs); the Redis scripts are
// shared with it (clients/lua/).

declare(strict_types=1);

namespace Rtinval;

const TAG = 'rtv1 ';
const APPLIED_KEY = 'rtinval:applied';
const DEFAULT_LEASE_TTL_MS = 10000;

/** What the cache held for a key (see Protocol::parse). */
final class Stored
{
    public function __construct(
        public readonly string $kind, // 'data', 'tombstone', 'lease' or 'foreign'
        public readonly string $basis,
        public readonly string $payload,
    ) {
    }
}

/** The fill protocol's stored forms. */
final class Protocol
{
    public static function parse(string $v): Stored
    {
        if (!str_starts_with($v, TAG)) {
            return new Stored('foreign', '-', $v);
        }
        $rest = substr($v, strlen(TAG));
        if (str_starts_with($rest, 'D ')) {
            $nl = strpos($rest, "\n");
            if ($nl !== false) {
                return new Stored('data', substr($rest, 2, $nl - 2), substr($rest, $nl + 1));
            }
        } elseif (str_starts_with($rest, 'T ') || str_starts_with($rest, 'L ')) {
            $fields = explode(' ', substr($rest, 2));
            if (count($fields) === 2) {
                return new Stored($rest[0] === 'T' ? 'tombstone' : 'lease', $fields[0], '');
            }
        }
        return new Stored('foreign', '-', $v);
    }

    /** A position as one field: no whitespace, '-' when empty. */
    public static function field(string $position): string
    {
        $clean = preg_replace('/\s/', '_', $position);
        return $clean === '' ? '-' : $clean;
    }

    public static function lease(string $basis, string $nonce): string
    {
        return TAG . 'L ' . self::field($basis) . ' ' . $nonce;
    }

    public static function data(string $basis, string $payload): string
    {
        return TAG . 'D ' . self::field($basis) . "\n" . $payload;
    }

    public static function nonce(): string
    {
        return bin2hex(random_bytes(8));
    }
}

/** What a fill must present: the marker its read saw. */
final class FillToken
{
    public function __construct(
        public readonly string $key,
        public readonly string $basis,
        public readonly string|int|float|null $marker, // Redis: the marker; memcached: its CAS id
    ) {
    }
}

/** The result of a read: a hit with its value, or a miss with the token for the fill. */
final class Lookup
{
    public function __construct(
        public readonly bool $hit,
        public readonly ?string $value,
        public readonly ?FillToken $token,
    ) {
    }
}

/** The node-local cache of one rtinval cache (`fill_protocol = true` in the consumer). */
final class NodeCache
{
    private ?string $readSha = null;
    private ?string $fillSha = null;

    private function __construct(
        private readonly ?\Redis $redis,
        private readonly ?\Memcached $memcached,
        private readonly string $prefix,
        private int $leaseTtlMs,
    ) {
    }

    /** A connected \Redis; keys get `$prefix` (the consumer's `prefix` for this cache). */
    public static function redis(\Redis $redis, string $prefix, int $leaseTtlMs = DEFAULT_LEASE_TTL_MS): self
    {
        return new self($redis, null, $prefix, $leaseTtlMs);
    }

    /** A \Memcached with its server added. Compression is turned off: the consumer and the
     * Rust client read the same values. */
    public static function memcached(\Memcached $m, string $prefix, int $leaseTtlMs = DEFAULT_LEASE_TTL_MS): self
    {
        $m->setOption(\Memcached::OPT_COMPRESSION, false);
        return new self(null, $m, $prefix, $leaseTtlMs);
    }

    /** Read `$key`; a miss leaves a lease that the fill must find intact. */
    public function get(string $key): Lookup
    {
        $full = $this->prefix . $key;
        if ($this->redis !== null) {
            $v = $this->script('read', [$full, $this->prefix . APPLIED_KEY, Protocol::nonce(), (string) $this->leaseTtlMs], 2);
            return $this->lookup($full, (string) $v, $v);
        }
        $m = $this->memcached;
        for ($round = 0; $round < 3; $round++) {
            $got = $m->getMulti([$full, $this->prefix . APPLIED_KEY], \Memcached::GET_EXTENDED);
            if ($got === false) {
                throw new CacheException('memcached: ' . $m->getResultMessage());
            }
            if (isset($got[$full])) {
                return $this->lookup($full, (string) $got[$full]['value'], $got[$full]['cas']);
            }
            $basis = isset($got[$this->prefix . APPLIED_KEY]) ? (string) $got[$this->prefix . APPLIED_KEY]['value'] : '';
            $m->add($full, Protocol::lease($basis, Protocol::nonce()), self::secs($this->leaseTtlMs));
        }
        return new Lookup(false, null, new FillToken($full, '-', null));
    }

    private function lookup(string $full, string $v, string|int|float $marker): Lookup
    {
        $s = Protocol::parse($v);
        return match ($s->kind) {
            'data', 'foreign' => new Lookup(true, $s->payload, null),
            default => new Lookup(false, null, new FillToken($full, $s->basis, $marker)),
        };
    }

    /** Store `$payload` for `$ttlMs` (0: no expiry; memcached rounds up to seconds), only if no
     * purge reached the key since the read that issued `$token`. False: not stored. */
    public function fill(FillToken $token, string $payload, int $ttlMs): bool
    {
        if ($token->marker === null) {
            return false;
        }
        $value = Protocol::data($token->basis, $payload);
        if ($this->redis !== null) {
            return (int) $this->script('fill', [$token->key, (string) $token->marker, $value, (string) $ttlMs], 1) === 1;
        }
        return $this->memcached->cas($token->marker, $token->key, $value, $ttlMs === 0 ? 0 : self::secs($ttlMs));
    }

    /** Read through the cache: a hit returns the cached payload; a miss calls `$load` (the
     * source read, started after this call) and fills with its result. A failing cache is
     * bypassed: the source's value is returned and nothing stored. */
    public function readThrough(string $key, int $ttlMs, callable $load): string
    {
        try {
            $r = $this->get($key);
        } catch (\Throwable) {
            return $load();
        }
        if ($r->hit) {
            return $r->value;
        }
        $v = $load();
        try {
            $this->fill($r->token, $v, $ttlMs);
        } catch (\Throwable) {
        }
        return $v;
    }

    private static function secs(int $ms): int
    {
        return max(1, intdiv($ms + 999, 1000));
    }

    /** EVALSHA of one of the shared scripts, loading it once per connection if the server lacks it. */
    private function script(string $name, array $args, int $numKeys): mixed
    {
        $sha = $name === 'read' ? $this->readSha : $this->fillSha;
        $this->redis->clearLastError();
        if ($sha !== null) {
            $r = $this->redis->evalSha($sha, $args, $numKeys);
            $err = $this->redis->getLastError();
            if ($err === null) {
                return $r;
            }
            $this->redis->clearLastError();
            if (!str_contains($err, 'NOSCRIPT')) {
                throw new CacheException('redis: ' . $err);
            }
        }
        $sha = $this->redis->script('load', self::source($name));
        if (!is_string($sha)) {
            throw new CacheException('redis: cannot load the ' . $name . ' script: ' . $this->redis->getLastError());
        }
        if ($name === 'read') {
            $this->readSha = $sha;
        } else {
            $this->fillSha = $sha;
        }
        $r = $this->redis->evalSha($sha, $args, $numKeys);
        $err = $this->redis->getLastError();
        if ($err !== null) {
            $this->redis->clearLastError();
            throw new CacheException('redis: ' . $err);
        }
        return $r;
    }

    private static function source(string $name): string
    {
        static $cache = [];
        return $cache[$name] ??= (string) file_get_contents(__DIR__ . '/../../lua/' . $name . '.lua');
    }
}

final class CacheException extends \RuntimeException
{
}

/** A wait that did not succeed: `$status` is 504 (timeout), 503 (node stale, resyncing or
 * stopping), 400 (bad position) or 0 (no answer). */
final class WaitException extends \RuntimeException
{
    public function __construct(public readonly int $status, string $message)
    {
        parent::__construct($message);
    }
}

/** The node barrier: `GET /wait` on this node's consumer. */
final class Barrier
{
    public function __construct(private readonly string $base)
    {
    }

    /** Return once this node has applied every invalidation up to `$position`. */
    public function wait(string $position, int $timeoutMs): void
    {
        $url = rtrim($this->base, '/') . '/wait?gtid=' . rawurlencode($position) . '&timeout_ms=' . $timeoutMs;
        $ctx = stream_context_create(['http' => [
            'ignore_errors' => true,
            'timeout' => $timeoutMs / 1000 + 5,
        ]]);
        $body = @file_get_contents($url, false, $ctx);
        $headers = $http_response_header ?? [];
        if ($body === false || $headers === []) {
            throw new WaitException(0, 'no answer from ' . $url);
        }
        $status = (int) (explode(' ', $headers[0])[1] ?? 0);
        if ($status !== 200) {
            throw new WaitException($status, trim($body));
        }
    }
}

/** The position of this connection's last commit, to wait for (MariaDB). On MySQL, set
 * `session_track_gtids = OWN_GTID` and read the tracked GTID instead. */
function last_gtid(\mysqli $db): string
{
    $r = $db->query('SELECT @@last_gtid');
    return (string) $r->fetch_row()[0];
}

/** A cache key from the rule set's template: `object:{id}` with ['id' => 42] → `object:42`.
 * Filters: `{col|ipv4}` (integer), `{col|ipv6}` (16 bytes), `{col|hex}`. */
function key(string $template, array $columns): string
{
    return preg_replace_callback('/\{([^}|]+)(?:\|([^}]+))?\}/', function (array $m) use ($columns, $template): string {
        $name = trim($m[1]);
        if (!array_key_exists($name, $columns)) {
            throw new \InvalidArgumentException("key template $template: no value for column $name");
        }
        $v = $columns[$name];
        return match (trim($m[2] ?? '')) {
            '' => (string) $v,
            'ipv4' => long2ip((int) $v),
            'ipv6' => strlen((string) $v) === 16 ? (string) inet_ntop((string) $v) : throw new \InvalidArgumentException("key template $template: an IPv6 address needs 16 bytes"),
            'hex' => bin2hex((string) $v),
            default => throw new \InvalidArgumentException("key template $template: unknown filter {$m[2]}"),
        };
    }, $template);
}
