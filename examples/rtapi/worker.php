<?php
// rtapi, the reference API worker: RackTables reads through the node cache with rtinval's PHP
// client (race-safe fills), and writes that return only once this node has invalidated them
// (read-your-writes). Run as a pool by pool.sh (PHP's built-in server with several worker
// processes); the consumer reloads the pool on pool_reset events. In production the same code
// runs under PHP-FPM (USR2 = graceful reload).
//
//   GET  /object/{id}              the object with its attributes and tags   (key object:{id})
//   GET  /port/{id}                a port (full RackTables schema)            (key port:{id})
//   GET  /ipv4/{a.b.c.d}           its allocations (full RackTables schema)   (key ipv4:{ip})
//   POST /object/{id}?name=NEW     rename, then wait for this node's purge
//
// Every answer is JSON with "cache": "hit" or "miss" and the worker's pid.
// Settings (environment): RTAPI_DB (host:port:user:password:database), RTAPI_REDIS
// (host:port), RTAPI_PREFIX (the consumer's cache prefix), RTAPI_NODE (the consumer's http.listen).

declare(strict_types=1);

require __DIR__ . '/../../clients/php/src/Rtinval.php';

const TTL_MS = 300000;

function fail(int $status, string $error): never
{
    http_response_code($status);
    header('Content-Type: application/json');
    echo json_encode(['error' => $error]), "\n";
    exit;
}

function db(): mysqli
{
    static $db = null;
    if ($db === null) {
        [$host, $port, $user, $password, $name] = explode(':', (string) getenv('RTAPI_DB'));
        mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
        $db = new mysqli($host, $user, $password, $name, (int) $port);
    }
    return $db;
}

function cache(): Rtinval\NodeCache
{
    static $cache = null;
    if ($cache === null) {
        [$host, $port] = explode(':', (string) getenv('RTAPI_REDIS'));
        $redis = new Redis();
        $redis->connect($host, (int) $port);
        $cache = Rtinval\NodeCache::redis($redis, (string) getenv('RTAPI_PREFIX'));
    }
    return $cache;
}

/** Read `$key` through the node cache; `$load` reads MariaDB (null: not found). */
function through(string $key, callable $load): array
{
    $r = cache()->get($key);
    if ($r->hit) {
        return ['cache' => 'hit', 'data' => json_decode($r->value, true)];
    }
    $row = $load();
    if ($row === null) {
        fail(404, "$key not found");
    }
    $json = json_encode($row);
    cache()->fill($r->token, $json, TTL_MS);
    return ['cache' => 'miss', 'data' => $row];
}

function one(string $sql, string $types, ...$args): ?array
{
    $st = db()->prepare($sql);
    $st->bind_param($types, ...$args);
    $st->execute();
    return $st->get_result()->fetch_assoc() ?: null;
}

function all(string $sql, string $types, ...$args): array
{
    $st = db()->prepare($sql);
    $st->bind_param($types, ...$args);
    $st->execute();
    return $st->get_result()->fetch_all(MYSQLI_ASSOC);
}

$method = $_SERVER['REQUEST_METHOD'];
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
$answer = null;

if (preg_match('#^/object/(\d+)$#', $path, $m) && $method === 'GET') {
    $id = (int) $m[1];
    $answer = through(Rtinval\key('object:{id}', ['id' => $id]), function () use ($id) {
        $o = one('SELECT id, name, label, objtype_id, asset_no, comment FROM Object WHERE id = ?', 'i', $id);
        if ($o !== null) {
            $o['attributes'] = all('SELECT attr_id, string_value, uint_value FROM AttributeValue WHERE object_id = ?', 'i', $id);
            $o['tags'] = array_column(all("SELECT tag_id FROM TagStorage WHERE entity_realm = 'object' AND entity_id = ?", 'i', $id), 'tag_id');
        }
        return $o;
    });
} elseif (preg_match('#^/port/(\d+)$#', $path, $m) && $method === 'GET') {
    $id = (int) $m[1];
    $answer = through(Rtinval\key('port:{id}', ['id' => $id]), fn () => one('SELECT id, object_id, name, iif_id, type, l2address, label FROM Port WHERE id = ?', 'i', $id));
} elseif (preg_match('#^/ipv4/([0-9.]+)$#', $path, $m) && $method === 'GET') {
    $ip = ip2long($m[1]);
    if ($ip === false) {
        fail(400, 'not an IPv4 address');
    }
    // An address may be allocated to several objects (shared, virtual): all of them.
    $answer = through(Rtinval\key('ipv4:{ip|ipv4}', ['ip' => $ip]), fn () => all('SELECT object_id, ip, name, type FROM IPv4Allocation WHERE ip = ? ORDER BY object_id', 'i', $ip) ?: null);
} elseif (preg_match('#^/object/(\d+)$#', $path, $m) && $method === 'POST') {
    $id = (int) $m[1];
    $name = (string) ($_GET['name'] ?? '');
    if ($name === '') {
        fail(400, 'name is missing');
    }
    $st = db()->prepare('UPDATE Object SET name = ? WHERE id = ?');
    $st->bind_param('si', $name, $id);
    $st->execute();
    $gtid = Rtinval\last_gtid(db());
    $t = hrtime(true);
    try {
        (new Rtinval\Barrier((string) getenv('RTAPI_NODE')))->wait($gtid, 2000);
        $answer = ['gtid' => $gtid, 'waited_ms' => round((hrtime(true) - $t) / 1e6, 1), 'invalidated' => true];
    } catch (Rtinval\WaitException $e) {
        // Committed, but this node cannot promise a fresh read yet: say so.
        $answer = ['gtid' => $gtid, 'invalidated' => false, 'status' => $e->status, 'why' => $e->getMessage()];
    }
} else {
    fail(404, "no route for $method $path");
}

header('Content-Type: application/json');
echo json_encode($answer + ['worker_pid' => getmypid()]), "\n";
